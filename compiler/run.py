"""`python -m compiler.run --artifact DIR --prompt "..."`: generate text from a host artifact.

Verifies the manifest hashes, loads the artifact with mobilemoe.runtime, and prints the text and the
prefill / decode tokens/s. Options as mobilemoe.generate: --max-new-tokens, --temperature, --top-p,
--seed, --chat, --threads.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from compiler.artifact import ArtifactError


def main(argv=None):
    from mobilemoe.generate import prompt_ids
    from mobilemoe.runtime import load_artifact
    from mobilemoe.tokenizer import load_model_tokenizer

    p = argparse.ArgumentParser(prog="python -m compiler.run", description=__doc__.split("\n")[0])
    p.add_argument("--artifact", type=Path, required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--chat", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    try:
        rt = load_artifact(a.artifact, num_threads=a.threads)
        tok, stop = load_model_tokenizer(rt.dir / "tokenizer.json", rt.config)
        ids = prompt_ids(tok, a.prompt, a.chat, rt.config.bos_token_id, own=rt.config.arch == "mobilemoe")
    except (ArtifactError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    new, stats = rt.generate(ids, a.max_new_tokens, a.temperature, a.top_p, eos_id=stop, seed=a.seed)
    print(a.prompt + tok.decode(new, skip_special_tokens=True))
    print(f"[{rt.backend} {a.artifact.name}: {stats}]", file=sys.stderr)


if __name__ == "__main__":
    main()
