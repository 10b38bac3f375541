"""`python -m eval.say CHECKPOINT "text" --out sample.wav`: one line of speech from a checkpoint (a run directory
means its newest checkpoint), optionally after a context clip of the voice and what it says.

    python -m eval.say runs/finetune_voice/main "Thanks for calling, how can I help?" --out sample.wav
    python -m eval.say /models/csm-1b "Hello." --context me.wav --context-text "This is how I sound." \\
        --codec kyutai/mimi --tokenizer meta-llama/Llama-3.2-1B
"""

from __future__ import annotations

import argparse

import soundfile as sf

from csm_train.generate import Sampling
from csm_train.layout import Segment
from data_pipeline.audio import load_audio
from data_pipeline.device import resolve_device
from data_pipeline.shards import MIMI_SAMPLE_RATE
from eval.speaker import Speaker, resolve_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m eval.say", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("checkpoint", help="run directory, training checkpoint, or exported model (any format)")
    parser.add_argument("text")
    parser.add_argument("--out", default="sample.wav")
    parser.add_argument("--speaker", type=int, default=0, help="speaker id (a one-voice dataset's voice is 0)")
    parser.add_argument("--context", help="an audio clip of the voice, spoken before the text as its context")
    parser.add_argument("--context-text", help="what the context clip says")
    parser.add_argument("--codec", help="codec weights (default: the one the run's dataset was coded with)")
    parser.add_argument("--tokenizer", help="Hugging Face tokenizer (default: the run's)")
    parser.add_argument("--max-seconds", type=float, default=20.0)
    parser.add_argument("--temperature", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quantize", choices=["int8", "int4"], help="weight-only quantized model (CPU only)")
    args = parser.parse_args()
    if bool(args.context) != bool(args.context_text):
        parser.error("--context and --context-text go together: the model reads the clip's words with its audio")

    tokenizer = args.tokenizer and {"_target_": "csm_train.tokenizer.load_tokenizer", "name_or_path": args.tokenizer}
    checkpoint = resolve_checkpoint(args.checkpoint, tokenizer, args.codec)
    device = resolve_device(args.device)
    sampling = Sampling(temperature=args.temperature, seed=args.seed)
    speaker = Speaker.from_checkpoint(
        checkpoint, device, args.quantize, max_seconds=args.max_seconds, sampling=sampling
    )
    turns = []
    if args.context:
        (codes,) = speaker.encode([load_audio(args.context, target_lufs=None)])
        turns.append(Segment(args.speaker, args.context_text, codes))
    (audio,) = speaker.say([[*turns, Segment(args.speaker, args.text)]])
    sf.write(args.out, audio, MIMI_SAMPLE_RATE)
    print(f"{args.out}: {len(audio) / MIMI_SAMPLE_RATE:.1f} s from {checkpoint.path}")


if __name__ == "__main__":
    main()
