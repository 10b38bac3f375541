"""`python -m csm_train.convert SRC OUT --to ours|sesame|transformers|gguf`: a checkpoint in any format csm_train
reads → ours, Sesame's, transformers', or a GGUF file for csm.rs (`OUT.gguf --to gguf --qtype f16|q8_0|q4_1`).

SRC is what `checkpoint.load_checkpoint` reads: ours, Sesame's, transformers', a Hub id, or a training checkpoint
(a Lightning `.ckpt`, a DeepSpeed ZeRO directory), which is consolidated on the way: its fp32 master weights
gathered into full tensors, LoRA adapters merged. `--to ours` then writes the one `model.safetensors` +
`config.json` that `CSM.from_pretrained` reads; `--to gguf` the one file csm.rs's loader reads (`gguf.py`: its
tensor names and `csm.*` metadata, quantized by the gguf package's reference quantizers), which
`CSM.from_pretrained` reads back dequantized.
"""

from __future__ import annotations

import json
from pathlib import Path

from csm_train.checkpoint import (
    TRUST_FLAG,
    load_checkpoint,
    save_checkpoint,
    save_gguf,
    save_sesame,
    save_transformers,
)
from csm_train.formats import TRANSFORMERS_TOKEN_IDS
from csm_train.model import CSM


def _like(directory: Path) -> tuple[object, dict]:
    """The codec and special-token ids of a transformers CSM directory."""
    from transformers import CsmForConditionalGeneration

    hf = CsmForConditionalGeneration.from_pretrained(directory)
    return hf.codec_model, {k: getattr(hf.config, k) for k in TRANSFORMERS_TOKEN_IDS}


def convert(
    source: str | Path,
    out: str | Path,
    to: str,
    like=None,
    codec=None,
    torch_file=False,
    trust_pickle=False,
    qtype: str = "q8_0",
) -> CSM:
    """Any checkpoint (ours, Sesame's, transformers', a GGUF, a training `.ckpt` or ZeRO directory) → `to` format.
    `trust_pickle`: see `load_checkpoint`; `qtype`: the GGUF's quantization (`--to gguf`)."""
    if to == "gguf" and Path(out).suffix != ".gguf":
        raise ValueError(f"--to gguf writes one file: name it *.gguf (got {out})")
    model = CSM.from_state_dict(*load_checkpoint(source, trust_pickle)).float()
    if to == "ours":
        save_checkpoint(model, out)
    elif to == "sesame":
        save_sesame(model, out, torch_file=torch_file)
    elif to == "transformers":
        config_file = Path(source) / "config.json"  # a ZeRO checkpoint directory has none
        if like is None and config_file.is_file() and json.loads(config_file.read_text()).get("model_type") == "csm":
            like = source  # keep the codec and token ids a transformers source came with
        if like is not None:
            mimi, token_ids = _like(Path(like))
        elif codec is not None:
            from transformers import MimiModel

            mimi, token_ids = MimiModel.from_pretrained(codec), None
        else:
            raise ValueError(
                "a transformers CSM carries its Mimi codec: give --codec (kyutai/mimi or a local MimiModel "
                "directory) or --like (a transformers CSM, e.g. sesame/csm-1b, whose codec and token ids to keep)"
            )
        save_transformers(model, out, mimi, token_ids)
    elif to == "gguf":
        report = save_gguf(model, out, qtype)
        print(f"{out} ({qtype}):\n{report.summary()}")
    else:
        raise ValueError(f"--to {to!r}: use ours, sesame, transformers or gguf")
    return model


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m csm_train.convert",
        description=__doc__.split("\n\n")[0],
        epilog="Nothing from a file runs code: torch files and ZeRO shards are read with torch's restricted unpickler "
        f"(csm_train.checkpoint), and a checkpoint holding more than tensors is refused; see {TRUST_FLAG}.",
    )
    parser.add_argument("source", help="checkpoint: a directory or file in any supported format")
    parser.add_argument("out", help="output directory (--to gguf: the .gguf file)")
    parser.add_argument("--to", required=True, choices=["ours", "sesame", "transformers", "gguf"])
    parser.add_argument(
        "--qtype",
        choices=["f16", "q8_0", "q4_1", "q4_k"],
        help="gguf: how csm.rs's quantized tensors (attention, MLP, projection, codebook0_head) are stored; the rest "
        "is f16. Default q8_0. q4_k needs a gguf package with a Q4_K quantizer (0.19.0 has none): q4_1 is the "
        "closest",
    )
    parser.add_argument("--like", help="transformers: a transformers CSM directory whose codec and token ids to keep")
    parser.add_argument("--codec", help="transformers: the Mimi codec to include (Hub id or directory)")
    parser.add_argument("--torch-file", action="store_true", help="sesame: ckpt.pt instead of model.safetensors")
    parser.add_argument(
        TRUST_FLAG,
        action="store_true",
        help="a training checkpoint (ZeRO directory or .ckpt) you trust, which the safe reader refuses: read it "
        "with torch.load(weights_only=False), as DeepSpeed's zero_to_fp32 does, which runs any code its files name",
    )
    args = parser.parse_args(argv)
    if args.qtype is not None and args.to != "gguf":
        parser.error("--qtype is for --to gguf")
    try:
        model = convert(
            args.source,
            args.out,
            args.to,
            like=args.like,
            codec=args.codec,
            torch_file=args.torch_file,
            trust_pickle=args.trust_pickle,
            qtype=args.qtype or "q8_0",
        )
    except (ValueError, FileNotFoundError) as error:  # a bad source or option, an untrusted pickle
        parser.exit(2, f"error: {error}\n")
    print(f"{args.source} → {args.out} ({args.to}): {model.num_parameters():,} parameters")


if __name__ == "__main__":
    main()
