"""An imported checkpoint's own chat template (mobilemoe/text_format.py): rendered in jinja2's sandbox
exactly as transformers' apply_chat_template renders it, the assistant's turns marked as
transformers marks them, used by `mobilemoe.generate --chat`; ours keep our format."""
import pytest

from mobilemoe.checkpoint import read_config
from mobilemoe.generate import DEFAULT_MODEL_DIR, main
from mobilemoe.text_format import OURS, ChatTemplateError, load_text_format
from mobilemoe.tokenizer import encode_chat, load_tokenizer
from tests.arch.hf_models import save_tiny, write_tokenizer

transformers = pytest.importorskip("transformers")

CHAT = [{"role": "system", "content": "w9 w10"}, {"role": "user", "content": "w11 w12 w13"},
        {"role": "assistant", "content": "w20 w21"}, {"role": "user", "content": "w14"},
        {"role": "assistant", "content": "w22 w23 w24"}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tokenizer(save_tiny("olmoe", tmp_path_factory.mktemp("c") / "olmoe"))


def test_chat_ids_and_mask_match_transformers(ckpt):
    tok, fmt = load_text_format(ckpt, read_config(ckpt))
    ids, mask = fmt.encode_chat(tok, CHAT)
    hf = transformers.AutoTokenizer.from_pretrained(ckpt)
    ref = hf.apply_chat_template(CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ids == list(ref["input_ids"]) and mask == list(ref["assistant_masks"])
    assert [tok.id_to_token(i) for i, m in zip(ids, mask) if m] == ["w20", "w21", "<|im_end|>",
                                                                   "w22", "w23", "w24", "<|im_end|>"]
    prompt, _ = fmt.encode_chat(tok, CHAT[:2], add_generation_prompt=True)
    assert prompt == list(hf.apply_chat_template(CHAT[:2], add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)["input_ids"])
    assert fmt.stop_ids == (1, 4)  # the config's eos_token_id, the tokenizer's eos_token <|im_end|>
    assert fmt.document([9, 10]) == [0, 9, 10, 1]  # text: the post-processor's <s>, the config's EOS


def test_generate_chat_uses_the_template(ckpt, capsys):
    main(["--checkpoint", str(ckpt), "--prompt", "w11 w12", "--chat", "--max-new-tokens", "3"])
    out = capsys.readouterr()
    assert out.out.startswith("w11 w12")
    assert "prefill 8 tok" in out.err  # <s> <|im_start|> user w11 w12 <|im_end|> <|im_start|> assistant


def test_our_models_keep_our_format():
    tok, fmt = load_text_format(DEFAULT_MODEL_DIR, read_config(DEFAULT_MODEL_DIR))
    assert fmt is OURS
    assert fmt.encode_chat(tok, CHAT[1:3]) == encode_chat(load_tokenizer(DEFAULT_MODEL_DIR), CHAT[1:3])


@pytest.mark.parametrize("template,message", [
    (None, r"tokenizer_config.json: no 'chat_template' \(nor a chat_template.jinja beside it\): "
           r"chats cannot be formatted for this model$"),
    ("{{ messages.__class__.__mro__ }}", r"chat template failed \(SecurityError: "),  # the sandbox holds
    ("{% for m in messages %}{{ m['content'] if loop.last else 'x' }} {% endfor %}",  # rewrites earlier turns
     r"renders message 2 differently in a longer conversation"),
    ("{{ raise_exception('no system role') }}", r"chat template failed \(ValueError: no system role\)$"),
])
def test_template_errors_are_one_line(ckpt, tmp_path, template, message):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text((ckpt / "config.json").read_text())
    write_tokenizer(d, template)
    tok, fmt = load_text_format(d, read_config(d))
    with pytest.raises(ChatTemplateError, match=message) as e:
        fmt.encode_chat(tok, CHAT)
    assert "\n" not in str(e.value) and str(d) in str(e.value)


def test_chat_template_jinja_file_wins(ckpt, tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text((ckpt / "config.json").read_text())
    write_tokenizer(d)
    (d / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }} {% endfor %}")
    tok, fmt = load_text_format(d, read_config(ckpt))
    assert fmt.render(CHAT[1:3]) == "w11 w12 w13 w20 w21 "
