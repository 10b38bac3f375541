"""The routes: OpenAI's Speech API (`POST /v1/audio/speech`, `GET /v1/models`, `/v1/audio/voices`) with CSM's
extras, conversations, `/health` and Prometheus `/metrics` (serve.telemetry).

`POST /v1/audio/speech` answers as OpenAI's does: the audio file's bytes as a chunked body
(`stream_format: "audio"`, the default) or server-sent events (`"sse"`: `speech.audio.delta` events whose
base64 `audio` pieces concatenate to the same file, then `speech.audio.done` with `usage`). Either way audio
leaves as soon as the first `chunk_frames` frames are generated and decoded (Mimi's streaming decoder, all
codebooks). `usage.input_tokens` is the prompt's length in backbone positions (voice, conversation and context
turns included) and `output_tokens` the frames generated; `/speech` also reports the prompt in `x-csm-*`
headers. `speed` other than 1.0 is refused (CSM has no speed control, and resampling would change the voice);
`instructions` are accepted and ignored (CSM takes no style prompt: a voice and context turns steer it) and the
response says so in `x-csm-instructions: ignored`. With `watermark.model` set, the audio is watermarked as it
streams (serve.watermark) and `x-csm-watermark` names the model.

`voice` is a built-in voice's name (`GET /v1/audio/voices`), or an uploaded voice's id (`{"id": "voice_…"}` or
the bare id) or name (the newest upload of that name).

CSM's extras (the `openai` client's `extra_body`): `temperature`, `top_k`, `seed`, `max_audio_length_ms`,
`speaker` (the speaker id of the answer, and of the voice's turn), `context` (turns `{"text", "audio": base64 of
any audio file, "speaker"}` spoken before the answer) and `conversation_id` (see `serve.conversations`).
"""

from __future__ import annotations

import base64
import binascii
import json
import tempfile
import time
from pathlib import Path
from typing import Annotated, Literal

import torch
from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from csm_train.generate import Sampling
from csm_train.layout import Segment, conversation_frames
from data_pipeline.audio import AudioError
from data_pipeline.shards import MIMI_FRAME_RATE
from serve.context import DoesNotFit, fit
from serve.conversations import CONVERSATION_ID
from serve.encode import MEDIA_TYPES, Encoder
from serve.engine import QueueFull
from serve.errors import APIError
from serve.voices import ingest

router = APIRouter()


class VoiceRef(BaseModel):
    id: str


class ContextTurn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str
    audio: str = Field(description="base64 of an audio file in any format FFmpeg reads")
    speaker: int = Field(0, ge=0, le=1000)


class SpeechRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt extra is an error, not silently ignored
    model: str
    input: str = Field(min_length=1)
    voice: str | VoiceRef
    instructions: str | None = Field(None, max_length=4096)
    response_format: Literal["mp3", "opus", "aac", "flac", "wav", "pcm"] = "mp3"
    speed: float = Field(1.0, ge=0.25, le=4.0)
    stream_format: Literal["audio", "sse"] = "audio"
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_k: int | None = Field(None, ge=1, le=2048)
    seed: int | None = Field(None, ge=0, lt=2**63)
    max_audio_length_ms: int | None = Field(None, gt=0)
    speaker: int = Field(0, ge=0, le=1000)
    context: list[ContextTurn] = []
    conversation_id: str | None = None


def _service(request: Request):
    return request.app.state.service


@router.get("/health")
async def health(request: Request):
    service = _service(request)
    return {"status": "ok", "engine": service.engine.stats(), "voices": len(service.voices.list()),
            "conversations": len(service.conversations)}  # fmt: skip


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request):
    body, media_type = _service(request).metrics.exposition()
    return Response(body, media_type=media_type)


@router.get("/v1/models")
async def models(request: Request):
    return {"object": "list", "data": [_service(request).model_card()]}


@router.get("/v1/models/{model_id}")
async def model(model_id: str, request: Request):
    service = _service(request)
    service.check_model(model_id, param=None)
    return service.model_card()


@router.post("/v1/audio/speech")
async def speech(body: SpeechRequest, request: Request):
    service, limits = _service(request), _service(request).limits
    service.check_model(body.model)
    if len(body.input) > limits.max_input_chars:
        raise APIError(400, f"input is {len(body.input)} characters; at most {limits.max_input_chars}", "input",
                       "string_above_max_length")  # fmt: skip
    if body.speed != 1.0:
        raise APIError(400, "speed: only 1.0 is supported (CSM has no speed control)", "speed", "unsupported_value")
    if body.conversation_id is not None and not CONVERSATION_ID.fullmatch(body.conversation_id):
        raise APIError(400, "conversation_id: 1-128 letters, digits, _ . : -", "conversation_id", "invalid_value")
    if len(body.context) > limits.max_context_turns:
        raise APIError(400, f"context: at most {limits.max_context_turns} turns", "context", "invalid_value")
    key = body.voice if isinstance(body.voice, str) else body.voice.id
    voice = service.voices.get(key)
    if voice is None:
        known = ", ".join(v.name if v.builtin else v.id for v in service.voices.list())
        raise APIError(400, f"voice {key!r} not found; voices here: {known}", "voice", "voice_not_found")

    max_frames = service.frame_budget(body.input, body.max_audio_length_ms)
    context = [await _context_turn(service, turn, i) for i, turn in enumerate(body.context)]
    history = service.conversations.history(body.conversation_id) if body.conversation_id else []
    try:
        prompt = fit(service.tokenizer, body.input, body.speaker, voice, history, context, service.limit, max_frames)
    except DoesNotFit as error:
        raise APIError(400, str(error), "input", "context_length_exceeded") from None
    frames = conversation_frames(prompt.segments, service.tokenizer, service.model.config.num_codebooks)
    defaults = service.sampling
    sampling = Sampling(
        max_frames=max_frames,
        temperature=defaults.temperature if body.temperature is None else body.temperature,
        topk=defaults.topk if body.top_k is None else body.top_k,
        seed=body.seed,
    )
    try:
        job = service.engine.submit(
            (frames.tokens, frames.tokens_mask), sampling, limits.max_request_seconds, prompt.voice_positions
        )
    except QueueFull as error:
        raise APIError(429, str(error), None, "queue_full") from None

    def finished(codes: torch.Tensor) -> None:
        if body.conversation_id and codes.shape[1]:
            service.conversations.append(body.conversation_id, Segment(body.speaker, body.input, codes, train=False))

    usage = {"input_tokens": prompt.frames, "context_turns": prompt.context_turns,
             "pruned_turns": prompt.pruned_turns, "voice_frames": prompt.voice_frames}  # fmt: skip
    headers = {f"x-csm-{k.replace('_', '-')}": str(v) for k, v in usage.items()}
    headers["x-csm-instructions"] = "ignored" if body.instructions else "none"
    headers["x-csm-watermark"] = service.watermark_spec() or "none"
    request.state.log.update(model=body.model, voice=voice.id, chars=len(body.input), format=body.response_format,
                             stream_format=body.stream_format, conversation_id=body.conversation_id,
                             **usage)  # fmt: skip
    audio = _audio(service, job, Encoder(body.response_format), finished, request.state)
    if body.stream_format == "sse":
        return StreamingResponse(_sse(audio, job, usage), media_type="text/event-stream", headers=headers)
    return StreamingResponse(audio, media_type=MEDIA_TYPES[body.response_format], headers=headers)


async def _audio(service, job, encoder: Encoder, finished, state):
    """The encoded file, piece by piece: frames → Mimi's streaming decoder → the format's encoder. A client
    that goes away cancels the stream here, which cancels the job: its generation stops at the next frame.
    Time to first audio and the real-time factor go to the metrics and the request's log line."""
    decoder = service.codec.streaming_decoder()
    mark = service.watermarker.stream() if service.watermarker else None
    codes, metrics, first = [], service.metrics, None
    try:
        async for chunk in job.chunks(service.chunk_frames):
            codes.append(chunk)
            samples = await service.in_codec_thread(decoder.decode, chunk)
            if mark is not None:  # the watermarked samples trail by its lookahead (~0.2 s)
                samples = await service.in_codec_thread(mark.feed, samples)
            data = await run_in_threadpool(encoder.feed, samples)
            if data:
                if first is None:
                    first = time.perf_counter() - state.started
                    metrics.first_audio.observe(first)
                    state.log["first_audio_s"] = round(first, 4)
                yield data
        if mark is not None:
            yield await run_in_threadpool(encoder.feed, await service.in_codec_thread(mark.close))
        yield await run_in_threadpool(encoder.close)
        finished(torch.cat(codes, dim=1) if codes else torch.zeros(0, 0, dtype=torch.long))
    finally:
        job.cancel()
        seconds = job.frames / MIMI_FRAME_RATE
        metrics.audio_seconds.inc(seconds)
        state.log.update(frames=job.frames, ended=job.ended or "cancelled", audio_s=round(seconds, 3))
        if seconds:
            rtf = (time.perf_counter() - state.started) / seconds
            metrics.rtf.observe(rtf)
            state.log["rtf"] = round(rtf, 3)


async def _sse(audio, job, usage: dict):
    try:
        async for data in audio:
            if data:
                event = {"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()}
                yield f"data: {json.dumps(event)}\n\n"
    finally:
        job.cancel()  # a client gone: stop now, not when the inner generator is collected
    usage = {**usage, "output_tokens": job.frames, "total_tokens": usage["input_tokens"] + job.frames}
    yield f"data: {json.dumps({'type': 'speech.audio.done', 'usage': usage, 'stop_reason': job.ended})}\n\n"


async def _context_turn(service, turn: ContextTurn, index: int) -> Segment:
    param = f"context.{index}.audio"
    try:
        data = base64.b64decode(turn.audio, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{param}: not base64", param, "invalid_value") from None
    codes, _ = await _encode_upload(service, data, param, service.limits.max_context_seconds)
    return Segment(turn.speaker, turn.text, torch.as_tensor(codes.astype("int64")), train=False)


async def _encode_upload(service, data: bytes, param: str, max_seconds: float):
    """Audio file bytes → (Mimi codes, the pipeline's normalised audio); AudioError → 400 saying why."""
    audio = await run_in_threadpool(_ingest, data, param, service.limits.min_voice_seconds, max_seconds)
    (codes,) = await service.in_codec_thread(service.codec.encode, [audio])
    return codes, audio


def _ingest(data: bytes, param: str, min_seconds: float, max_seconds: float):
    with tempfile.NamedTemporaryFile(prefix="csm-serve-", suffix=".upload") as f:
        f.write(data)
        f.flush()
        try:
            return ingest(Path(f.name), min_seconds, max_seconds)
        except AudioError as error:
            raise APIError(400, f"{param}: {error.reason}: {error.detail}", param, f"audio_{error.reason}") from None


@router.get("/v1/audio/voices")
async def list_voices(request: Request):
    return {"object": "list", "data": [v.public() for v in _service(request).voices.list()]}


@router.post("/v1/audio/voices")
async def create_voice(
    request: Request,
    name: Annotated[str, Form(min_length=1, max_length=64)],
    audio_sample: Annotated[UploadFile, File()],
    transcript: Annotated[str | None, Form(max_length=4096)] = None,
    consent: Annotated[str | None, Form()] = None,  # OpenAI's consent recording id: accepted, not checked here
    type: Annotated[Literal["audio_sample"], Form()] = "audio_sample",
):
    """A voice from a reference clip (10 s to 3 min works best) and what it says: see serve.voices."""
    service, limits = _service(request), _service(request).limits
    if audio_sample.size is not None and audio_sample.size > limits.max_upload_bytes:
        raise APIError(413, f"audio_sample is {audio_sample.size} bytes; at most {limits.max_upload_bytes}",
                       "audio_sample", "file_too_large")  # fmt: skip
    if not name.isprintable():
        raise APIError(400, "name: printable characters only", "name", "invalid_value")
    if transcript is not None and not transcript.strip():
        transcript = None
    if transcript is None and service.transcriber is None:
        raise APIError(400, "transcript is required: this server has no ASR (asr: null)", "transcript", "missing")
    data = await audio_sample.read()
    codes, audio = await _encode_upload(service, data, "audio_sample", limits.max_voice_seconds)
    words = None
    if transcript is None:
        words = await run_in_threadpool(service.transcriber.words, audio)
        if not words:
            raise APIError(400, "no words heard in audio_sample: send its transcript", "transcript", "no_speech")
        transcript = " ".join(w for w, _, _ in words)
    voice = await run_in_threadpool(service.voices.add, name, transcript.strip(), codes, words)
    return voice.public()


@router.delete("/v1/audio/voices/{voice_id}")
async def delete_voice(voice_id: str, request: Request):
    voices = _service(request).voices
    voice = voices.get(voice_id)
    if voice is not None and voice.builtin:
        raise APIError(400, f"voice {voice_id!r} is built in and cannot be deleted", "voice_id", "builtin_voice")
    if voice is None or voice.id != voice_id or not await run_in_threadpool(voices.delete, voice_id):
        raise APIError(404, f"no voice with id {voice_id!r}", "voice_id", "voice_not_found")
    return {"id": voice_id, "object": "audio.voice.deleted", "deleted": True}


@router.delete("/v1/conversations/{conversation_id}")
async def delete_conversation(conversation_id: str, request: Request):
    if not _service(request).conversations.delete(conversation_id):
        raise APIError(404, f"no conversation {conversation_id!r}", "conversation_id", "conversation_not_found")
    return {"id": conversation_id, "object": "conversation.deleted", "deleted": True}
