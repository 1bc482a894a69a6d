"""Run llama.cpp's own convert_hf_to_gguf.py on one of our checkpoints (no other change to it).

    python convert.py LLAMA_CPP_SRC CHECKPOINT_DIR [convert_hf_to_gguf.py arguments...]

Two gaps between our checkpoints and that converter, bridged here and printed when used:
- our BPE tokenizer (tokenizers' ByteLevel pre-tokenizer with the GPT-2 regex) is not in the
  converter's table of known pre-tokenizer hashes: it is named "gpt-2", llama.cpp's pre-tokenizer
  for that regex, instead of stopping. Only the tokenizer's name is affected, never the weights.
- a checkpoint without tokenizer.json (preset shapes with random weights) gets llama.cpp's "none"
  vocabulary of vocab_size dummy tokens: llama-bench and the logits check use token ids only.
"""
import json
import sys
from pathlib import Path

src, ckpt = Path(sys.argv[1]), Path(sys.argv[2])
sys.path[:0] = [str(src), str(src / "gguf-py"), str(src.parent / "pydeps")]  # pydeps: sentencepiece (build())
sys.argv = [str(src / "convert_hf_to_gguf.py"), str(ckpt), *sys.argv[3:]]

import convert_hf_to_gguf  # noqa: E402
from conversion.base import TextModel, logger  # noqa: E402

_known_pre = TextModel.get_vocab_base_pre


def get_vocab_base_pre(self, tokenizer) -> str:
    try:
        return _known_pre(self, tokenizer)
    except NotImplementedError:
        pre = json.loads((self.dir_model / "tokenizer.json").read_text()).get("pre_tokenizer") or {}
        if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
            logger.warning("mobilemoe: unlisted ByteLevel BPE pre-tokenizer (GPT-2 regex) written as 'gpt-2'")
            return "gpt-2"
        raise


def set_vocab_none(self) -> None:
    n = self.hparams["vocab_size"]
    logger.warning(f"mobilemoe: {self.dir_model} has no tokenizer.json: 'none' vocabulary of {n} dummy tokens")
    self.gguf_writer.add_tokenizer_model("none")
    self.gguf_writer.add_vocab_size(n)


TextModel.get_vocab_base_pre = get_vocab_base_pre
if not (ckpt / "tokenizer.json").is_file():
    hp = json.loads((ckpt / "config.json").read_text())
    arch = convert_hf_to_gguf.get_model_architecture(hp, convert_hf_to_gguf.ModelType.TEXT)
    cls = convert_hf_to_gguf.get_model_class(arch)
    cls.set_vocab = set_vocab_none
convert_hf_to_gguf.main()
