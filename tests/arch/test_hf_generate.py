"""mobilemoe.generate on an imported checkpoint with its own tokenizer.json (no MobileMoE special
tokens): the tokenizer's post-processor adds BOS, generation stops at the config's eos_token_id."""
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from mobilemoe.checkpoint import load_checkpoint
from mobilemoe.generate import generate, main, prompt_ids
from mobilemoe.tokenizer import load_model_tokenizer
from tests.arch.hf_models import save_tiny

pytest.importorskip("transformers")


def foreign_tokenizer(path):
    """A word-level tokenizer as an HF model would ship: <s>=0, </s>=1, <pad>=2, words after."""
    vocab = {"<s>": 0, "</s>": 1, "<pad>": 2, **{f"w{i}": i for i in range(3, 512)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.add_special_tokens(["<s>", "</s>", "<pad>"])
    tok.save(str(path))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = save_tiny("qwen3_moe", tmp_path_factory.mktemp("g") / "qwen3_moe")
    foreign_tokenizer(d / "tokenizer.json")
    return d


def test_generate_with_imported_tokenizer(ckpt, capsys):
    model = load_checkpoint(ckpt)
    tok, stop = load_model_tokenizer(ckpt, model.config)
    assert stop == (1,)  # the config's eos_token_id
    ids = prompt_ids(tok, "w5 w9", chat=False, bos_id=model.config.bos_token_id, own=False)
    assert ids == [0, 5, 9]
    main(["--checkpoint", str(ckpt), "--prompt", "w5 w9", "--max-new-tokens", "3"])
    out = capsys.readouterr()
    assert out.out.startswith("w5 w9") and "tok/s" in out.err
    new, _ = generate(model, ids, 3)
    with torch.no_grad():
        first = model(torch.tensor([ids]))[0][0, -1].argmax().item()
    assert new[0] == first


def test_chat_without_a_chat_template_is_refused(ckpt):
    with pytest.raises(SystemExit, match=r"tokenizer_config.json: no 'chat_template' \(nor a chat_template.jinja beside it\): chats cannot be formatted for this model$"):
        main(["--checkpoint", str(ckpt), "--prompt", "w5", "--chat"])
