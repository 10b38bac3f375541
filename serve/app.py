"""The server built from its config: the checkpoint's model, tokenizer and codec (as eval resolves them), the
voice store with its built-in voices, conversation memory, the engine, and the FastAPI app around them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from fastapi import FastAPI

from csm_train.generate import Sampling, compile_decoding
from data_pipeline.device import resolve_device
from data_pipeline.shards import MIMI_FRAME_RATE
from eval.speaker import Speaker, resolve_checkpoint
from serve import api, playground
from serve.conversations import Conversations
from serve.engine import Engine
from serve.errors import APIError, install_handlers
from serve.security import BodyLimit, KeyAuth
from serve.telemetry import Metrics, Telemetry
from serve.voices import Transcriber, VoiceStore, make_builtin_voices
from serve.watermark import Watermarker

log = logging.getLogger(__name__)
MB = 1 << 20


@dataclass(frozen=True)
class Limits:
    max_input_chars: int = 4096
    max_body_bytes: int = 16 * MB
    max_upload_bytes: int = 10 * MB
    min_voice_seconds: float = 1.0
    max_voice_seconds: float = 180.0
    max_context_seconds: float = 60.0
    max_context_turns: int = 16
    max_audio_ms: int = 60_000
    max_request_seconds: float = 300.0


class Service:
    """What the routes share. `limit` is the prompt-plus-answer length a request may use: the backbone's
    `max_seq_len`, or less (`context_frames`)."""

    def __init__(self, cfg):
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        checkpoint = resolve_checkpoint(cfg.checkpoint, cfg.tokenizer, cfg.codec)
        speaker = Speaker.from_checkpoint(checkpoint, resolve_device(cfg.device), cfg.quantize)
        self.model, self.tokenizer, self.codec = speaker.model, speaker.tokenizer, speaker.codec
        if cfg.compile:
            compile_decoding(self.model)  # eager, with a warning, where torch.compile is unavailable
        self.checkpoint, self.created = checkpoint, int(time.time())
        self.model_name, self.model_aliases = cfg.model_name, list(cfg.model_aliases)
        self.limits = Limits(
            **{k: v for k, v in cfg.limits.items() if not k.endswith("_mb")},
            max_body_bytes=int(cfg.limits.max_body_mb * MB),
            max_upload_bytes=int(cfg.limits.max_upload_mb * MB),
        )
        max_seq_len = self.model.config.backbone.max_seq_len
        self.limit = min(cfg.context_frames or max_seq_len, max_seq_len)
        self.sampling = Sampling(temperature=cfg.sampling.temperature, topk=cfg.sampling.topk)
        self.seconds_per_char, self.max_audio_seconds = cfg.seconds_per_char, cfg.max_audio_seconds
        self.chunk_frames = cfg.chunk_frames
        self.voices = VoiceStore(cfg.voice_dir, self.codec.weights_id)
        make_builtin_voices(self.voices, cfg.builtin_voices, self.codec.encode)
        self.transcriber = Transcriber(cfg.asr) if cfg.asr else None
        self.conversations = Conversations(self.tokenizer, self.limit, cfg.conversation_ttl_s, cfg.max_conversations)
        wm = cfg.watermark
        self.watermarker = Watermarker.load(wm.model, wm.device, wm.message) if wm.model else None
        self.engine = Engine(self.model, cfg.queue_size, cfg.max_batch, cfg.prefix_cache_mb)
        self.metrics = Metrics(self.engine)
        # Mimi runs on one thread of its own: every request's audio is decoded by the same thread, so by the same
        # kernels (a thread that other libraries' calls, such as the ASR's, left with other settings could round
        # differently), and the engine's thread and this one share the CPU without oversubscribing it.
        self.codec_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="csm-codec")

    async def in_codec_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.codec_thread, fn, *args)

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "csm-train",
                "checkpoint": str(self.checkpoint.path), "step": self.checkpoint.step,
                "aliases": self.model_aliases, "watermark": self.watermark_spec()}  # fmt: skip

    def watermark_spec(self) -> str | None:
        return self.watermarker.spec if self.watermarker else None

    def check_model(self, name: str, param: str | None = "model") -> None:
        if name not in (self.model_name, *self.model_aliases):
            raise APIError(404, f"model {name!r} not found; this server has {self.model_name!r}", param,
                           "model_not_found")  # fmt: skip

    def frame_budget(self, text: str, max_audio_length_ms: int | None) -> int:
        """The answer's frame budget: the request's `max_audio_length_ms`, or as eval's Speaker sets it from the
        text's length (a model that never says end-of-audio stops there)."""
        if max_audio_length_ms is None:
            seconds = min(self.max_audio_seconds, 1.0 + self.seconds_per_char * len(text))
            return math.ceil(seconds * MIMI_FRAME_RATE)
        if max_audio_length_ms > self.limits.max_audio_ms:
            raise APIError(400, f"max_audio_length_ms: at most {self.limits.max_audio_ms}", "max_audio_length_ms",
                           "invalid_value")  # fmt: skip
        return math.ceil(max_audio_length_ms / 1000 * MIMI_FRAME_RATE)


def create_app(service: Service, keys: list[str]) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        # uvicorn has let the requests in flight finish (SIGTERM, Ctrl-C): the engine's queue is empty by now
        service.engine.close()
        service.codec_thread.shutdown()

    app = FastAPI(title="csm-train serve", summary="OpenAI-compatible speech for a CSM checkpoint", lifespan=lifespan)
    app.state.service = service
    install_handlers(app)
    app.include_router(api.router)
    app.include_router(playground.router)
    app.add_middleware(BodyLimit, max_bytes=service.limits.max_body_bytes)
    app.add_middleware(KeyAuth, keys=keys)  # before a body is read
    app.add_middleware(
        Telemetry, metrics=service.metrics, routes=[*api.router.routes, *playground.router.routes]
    )  # added last: runs first, so it sees refusals too
    return app
