"""`python -m compiler.run --artifact DIR --prompt "..."`: generate text from a host artifact.

Verifies the manifest hashes, loads the artifact with mobilemoe.runtimes, and prints the text, what
produced it (backend, target, weight and activation formats) and the prefill / decode tokens/s.
Options as mobilemoe.generate: --max-new-tokens, --temperature, --top-p, --seed, --chat, --threads.

--reference CKPT also runs the float PyTorch model of that checkpoint greedily on the same prompt and
prints its text with the top-1 agreement between the two: the share of the artifact's tokens that are
the reference's greedy choice given the same preceding tokens. INT4 weights (and int8 activations
where the CPU has a dot instruction) move some logits, so the texts can part ways after a near tie;
a high agreement says the artifact is right.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mobilemoe.artifact import ArtifactError
from mobilemoe.checkpoint import CheckpointError, load_checkpoint
from mobilemoe.generate import checked_prompt_ids, generate, positive_int, teacher_forced_top1
from mobilemoe.runtimes import load_artifact
from mobilemoe.text_format import load_text_format


def produced_by(manifest: dict) -> str:
    """One line: backend, target and number formats of an artifact, from its manifest."""
    q = manifest.get("quantization") or {}
    target = manifest.get("target", {}).get("name", "?")
    if not q:
        return f"{manifest.get('backend', '?')} artifact for {target}, float32 weights and activations"
    weights = (f"INT4 weights (group {q.get('group_size')}, {q.get('scale_dtype')} scales; router and norms "
               f"float32)")
    acts = q.get("activations")
    if acts is None:  # ONNX Runtime: MatMulNBits' accuracy level picks the compute type
        level = (manifest.get("onnx") or {}).get("accuracy_level", 0)
        acts = f"ONNX Runtime accuracy level {level} ({'int8' if level == 4 else 'float32'})"
    return f"{manifest.get('backend', '?')} artifact for {target}: {weights}, activations {acts}"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m compiler.run", description=__doc__.split("\n")[0])
    p.add_argument("--artifact", type=Path, required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--chat", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--reference", type=Path, default=None, metavar="CKPT",
                   help="also generate with this checkpoint's float PyTorch model and print the top-1 agreement")
    a = p.parse_args(argv)
    try:
        rt = load_artifact(a.artifact, num_threads=a.threads)
        tok, fmt = load_text_format(rt.dir, rt.config, rt.dir / "tokenizer.json")  # an imported model's own
        stop = fmt.stop_ids
        ids = checked_prompt_ids(tok, a.prompt, a.chat, rt.config.bos_token_id, a.max_new_tokens,
                                 rt.config.max_seq_len, rt.config.vocab_size, own=rt.config.arch == "mobilemoe",
                                 fmt=fmt)
        ref = load_checkpoint(a.reference) if a.reference else None
    except (ArtifactError, CheckpointError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    new, stats = rt.generate(ids, a.max_new_tokens, a.temperature, a.top_p, eos_id=stop, seed=a.seed)
    print(a.prompt + tok.decode(new, skip_special_tokens=True))
    print(f"[{rt.backend} {a.artifact.name}: {stats}]", file=sys.stderr)
    print(f"[produced by: {produced_by(rt.manifest)}]")
    if ref is not None:
        ref_new, _ = generate(ref, ids, a.max_new_tokens, eos_id=stop)
        print(f"\nreference (float32 PyTorch, {a.reference}, greedy):")
        print(a.prompt + tok.decode(ref_new, skip_special_tokens=True))
        agree = teacher_forced_top1(ref, ids, new)
        how = "greedy" if a.temperature <= 0 else "sampled (agreement is lower by design)"
        print(f"[top-1 agreement of the artifact's {len(new)} {how} tokens with the reference: {agree:.3f}]")


if __name__ == "__main__":
    main()
