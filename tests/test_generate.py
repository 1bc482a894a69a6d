import torch

from mobilemoe.checkpoint import save_checkpoint
from mobilemoe.generate import generate, main, sample
from mobilemoe.tokenizer import load_tokenizer


def test_greedy_equals_full_forward_argmax(tiny_moe):
    prompt = [0, 5, 9, 33]
    new, stats = generate(tiny_moe, prompt, 12)
    seq = list(prompt)
    for _ in range(12):  # no KV cache: recompute the whole sequence each step
        with torch.no_grad():
            seq.append(int(tiny_moe(torch.tensor([seq]))[0][0, -1].argmax()))
    assert new == seq[len(prompt):]
    assert stats.prompt_tokens == 4 and stats.new_tokens == 12 and stats.decode_tok_s > 0


def test_stops_at_eos(tiny_moe):
    first, _ = generate(tiny_moe, [0, 5], 1)
    new, _ = generate(tiny_moe, [0, 5], 10, eos_id={first[0]})
    assert new == first


def test_top_p_sampling_is_seeded_and_restricted():
    logits = torch.tensor([5.0, 4.9, -10.0, -10.0])
    draws = {sample(logits, 1.0, 0.9, torch.Generator().manual_seed(s)) for s in range(50)}
    assert draws == {0, 1}  # p = .525, .475, ~0, ~0: the nucleus for 0.9 is two tokens
    draws = {sample(logits, 1.0, 0.5, torch.Generator().manual_seed(s)) for s in range(50)}
    assert draws == {0}  # the first token alone reaches 0.5
    a = [sample(logits, 0.8, 0.9, torch.Generator().manual_seed(1)) for _ in range(3)]
    b = [sample(logits, 0.8, 0.9, torch.Generator().manual_seed(1)) for _ in range(3)]
    assert a == b
    assert sample(torch.tensor([0.0, 3.0, 1.0])) == 1  # temperature 0: greedy


def test_prompt_too_long(tiny_moe):
    import pytest
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len"):
        generate(tiny_moe, [1] * 250, 10)


def test_cli(tmp_path, tiny_moe, capsys):
    ckpt = save_checkpoint(tiny_moe, tmp_path / "ckpt", tokenizer=load_tokenizer())
    main(["--checkpoint", str(ckpt), "--prompt", "a", "--max-new-tokens", "5", "--temperature", "0.7",
          "--top-p", "0.9", "--seed", "0"])
    out = capsys.readouterr()
    assert out.out.startswith("a") and "prefill" in out.err and "tok/s" in out.err
