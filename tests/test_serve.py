"""`python -m serve` as users run it: a real server process (uvicorn) on a tiny random-weights checkpoint with a
byte tokenizer and the random-init Mimi, called with the official `openai` client (and httpx where the client has
no method). Every response format decodes to 24 kHz audio, both stream formats stream, an uploaded voice is the
prompt's context, a conversation's context grows and is pruned, a disconnect stops generation, a full queue
answers 429, bad inputs get their status and message, and a SIGKILL mid-write leaves the voice store readable."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time

import av
import httpx
import numpy as np
import openai
import pytest
import soundfile as sf
import torch
from conftest import SERVE_ARGS, SERVE_CONTEXT_FRAMES, SERVE_KEY, serve_command, start_server
from prometheus_client.parser import text_string_to_metric_families

from csm_train import CSM
from csm_train.tokenizer import ByteTokenizer
from data_pipeline.demo_corpus import speak

FRAME_SAMPLES = 1920  # 80 ms at 24 kHz
SHORT = {"max_audio_length_ms": 400, "seed": 0}  # 5 frames


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=SERVE_KEY, max_retries=0)


def say(client, text="Hello there.", voice="alloy", **extra):
    """One request with the raw response: (audio bytes, headers)."""
    fmt = extra.pop("response_format", "pcm")
    response = client.audio.speech.with_raw_response.create(
        model="csm", input=text, voice=voice, response_format=fmt, extra_body={**SHORT, **extra}
    )
    return response.content, response.headers


def decode(data: bytes) -> tuple[np.ndarray, int, int]:
    """(samples, the stream's decoded rate, the rate the container records)."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        samples = np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(stream)])
        return samples, stream.codec_context.sample_rate, stream.rate


def health(server) -> dict:
    return httpx.get(f"{server}/health").json()


def test_models_health_and_keys(server, client):
    assert [m.id for m in client.models.list()] == ["csm"]
    assert health(server)["status"] == "ok"  # no key needed
    anonymous = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="incorrect API key"):
        anonymous.models.list()
    response = httpx.get(f"{server}/v1/models")
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3", "opus", "aac"])
def test_every_format_decodes_to_24khz(client, fmt):
    data, headers = say(client, response_format=fmt)
    samples, rate, recorded = decode(data)
    if fmt == "opus":  # Opus decodes at 48 kHz by definition; the header records the 24 kHz input
        assert data[:4] == b"OggS" and rate == 48_000 and recorded == 48_000
        head = data.index(b"OpusHead")
        assert int.from_bytes(data[head + 12 : head + 16], "little") == 24_000
    else:
        assert rate == 24_000
    seconds = len(samples) / rate
    assert 0.35 <= seconds <= 0.5, seconds  # 5 frames = 0.4 s (+ the lossy encoders' padding)
    assert headers["content-type"].startswith("audio/")


def test_pcm_is_headerless_s16le_and_same_seed_same_audio(client):
    pcm, _ = say(client, response_format="pcm")
    wav, _ = say(client, response_format="wav")
    assert len(pcm) == 5 * FRAME_SAMPLES * 2
    samples, rate = sf.read(io.BytesIO(wav), dtype="int16")
    assert rate == 24_000 and samples.tobytes() == pcm  # same seed, same audio, whatever the format
    other, _ = say(client, response_format="pcm", seed=1)
    assert other != pcm


def test_sse_stream(client):
    with client.audio.speech.with_streaming_response.create(
        model="csm", input="Hello there.", voice="alloy", response_format="pcm", stream_format="sse",
        extra_body={"max_audio_length_ms": 800, "seed": 0},
    ) as response:  # fmt: skip
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    *deltas, done = events
    assert len(deltas) == 2 and all(e["type"] == "speech.audio.delta" for e in deltas)  # chunk_frames=5
    audio = b"".join(base64.b64decode(e["audio"]) for e in deltas)
    assert len(audio) == 10 * FRAME_SAMPLES * 2
    assert done["type"] == "speech.audio.done" and done["usage"]["output_tokens"] == 10
    usage = done["usage"]
    assert usage["total_tokens"] == usage["input_tokens"] + 10 and usage["context_turns"] == 1


def test_audio_stream_arrives_in_pieces(client):
    pieces = []
    with client.audio.speech.with_streaming_response.create(
        model="csm", input="Hello there.", voice="alloy", response_format="pcm",
        extra_body={"max_audio_length_ms": 1200, "seed": 0},
    ) as response:  # fmt: skip
        for piece in response.iter_bytes():
            pieces.append((time.monotonic(), len(piece)))
    assert sum(n for _, n in pieces) == 15 * FRAME_SAMPLES * 2
    assert len(pieces) >= 2 and pieces[-1][0] - pieces[0][0] > 0.05  # the first piece left before the last was made


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "me.wav"
    sf.write(path, speak("I made some tea for everyone this morning.", "en+quincy", 150), 24_000)
    return path


def test_uploaded_voice_is_the_prompts_context(server, serve_voice_dir, client, clip):
    transcript = "I made some tea for everyone this morning."
    voice = client.audio.voices.create(
        audio_sample=("me.wav", clip.read_bytes(), "audio/wav"), consent="cons_test", name="../../me",
        extra_body={"transcript": transcript},
    )  # fmt: skip
    assert voice.object == "audio.voice" and voice.id.startswith("voice_") and voice.name == "../../me"
    assert sorted(p.name for p in serve_voice_dir.iterdir()) == ["alloy", voice.id]  # a name is never a path
    listed = {v["id"]: v for v in httpx.get(f"{server}/v1/audio/voices", headers=auth()).json()["data"]}
    assert set(listed) == {"alloy", voice.id} and listed["alloy"]["builtin"]
    frames = listed[voice.id]["frames"]
    assert listed[voice.id]["transcript"] == transcript and 20 < frames < 60  # ~2.5 s at 12.5 Hz

    _, headers = say(client, voice={"id": voice.id})
    text_positions = len(f"[0]{transcript}".encode()) + 2  # BOS, EOS
    answer_positions = len(b"[0]Hello there.") + 2
    assert int(headers["x-csm-voice-frames"]) == frames
    assert int(headers["x-csm-input-tokens"]) == text_positions + frames + 1 + answer_positions
    _, by_name = say(client, voice="../../me")
    assert by_name["x-csm-input-tokens"] == headers["x-csm-input-tokens"]

    deleted = client.audio.voices.delete(voice.id)
    assert deleted.deleted and deleted.id == voice.id
    with pytest.raises(openai.BadRequestError, match="not found"):
        say(client, voice={"id": voice.id})


def test_upload_without_transcript_is_transcribed(server, client, clip):
    voice = client.audio.voices.create(
        audio_sample=("me.wav", clip.read_bytes(), "audio/wav"), consent="cons_test", name="asr"
    )
    listed = {v["id"]: v for v in httpx.get(f"{server}/v1/audio/voices", headers=auth()).json()["data"]}
    assert "tea" in listed[voice.id]["transcript"].lower()  # Whisper tiny.en heard the espeak clip
    client.audio.voices.delete(voice.id)


def test_conversation_grows_then_is_pruned(server, client):
    text = "Tell me more about the weather today."
    seen = []
    for _ in range(6):
        _, headers = say(client, text, conversation_id="talk-1")
        seen.append((int(headers["x-csm-context-turns"]), int(headers["x-csm-pruned-turns"])))
        assert int(headers["x-csm-input-tokens"]) + 5 <= SERVE_CONTEXT_FRAMES
    # the prompt: alloy's turn, the earlier turns that fit, the text; positions = bytes + BOS + EOS (+ frames + end)
    alloy = next(v for v in httpx.get(f"{server}/v1/audio/voices", headers=auth()).json()["data"] if v["id"] == "alloy")
    voice = len(f"[0]{alloy['transcript']}".encode()) + 2 + alloy["frames"] + 1
    answer = len(f"[0]{text}".encode()) + 2
    room = SERVE_CONTEXT_FRAMES - 5 - answer - voice
    fits = room // (answer + 5 + 1)  # each earlier turn: its text, 5 frames, end of audio
    assert 1 <= fits <= 4
    assert seen == [(1 + min(k, fits), max(0, k - fits)) for k in range(6)]  # grows, then the oldest go
    assert httpx.delete(f"{server}/v1/conversations/talk-1", headers=auth()).json()["deleted"] is True
    _, headers = say(client, text, conversation_id="talk-1")
    assert headers["x-csm-context-turns"] == "1"
    assert httpx.delete(f"{server}/v1/conversations/nope", headers=auth()).status_code == 404


def auth() -> dict:
    return {"Authorization": f"Bearer {SERVE_KEY}"}


def wait_for(condition, timeout=20.0, state=lambda: None):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out: {state()}"
        time.sleep(0.2)


def long_stream(server):
    """A request for 20 s of audio, its headers read, its body not."""
    body = {"model": "csm", "input": "Hello.", "voice": "alloy", "response_format": "pcm",
            "max_audio_length_ms": 20_000}  # fmt: skip
    stream = httpx.stream("POST", f"{server}/v1/audio/speech", json=body, headers=auth(), timeout=60)
    return stream, stream.__enter__()


def test_disconnect_stops_generation_and_full_queue_answers_429(server, client):
    engine = lambda: health(server)["engine"]  # noqa: E731
    before = engine()["jobs"].get("cancelled", 0)
    streams = []
    for running, queued in ((1, 0), (2, 0), (2, 1), (2, 2)):  # two share the batch (max_batch=2), two wait
        streams.append(long_stream(server))
        assert streams[-1][1].status_code == 200
        wait_for(lambda r=running, q=queued: (e := engine())["running"] == r and e["queued"] == q, state=engine)
    audio = streams[0][1].iter_bytes()  # kept: a collected iterator closes its response
    assert next(audio)  # audio is flowing
    with pytest.raises(openai.RateLimitError, match="already waiting"):  # queue_size=2
        say(client)
    for context, _ in streams:  # every client goes away
        context.__exit__(None, None, None)
    wait_for(lambda: engine()["jobs"].get("cancelled", 0) == before + 4, state=engine)
    assert engine()["running"] == 0 and engine()["queued"] == 0


def test_concurrent_requests_share_steps_and_keep_their_seeds(server, client):
    alone = {seed: say(client, "Shall we go?", seed=seed, max_audio_length_ms=800)[0] for seed in (3, 4)}
    before = health(server)["engine"]["batched_steps"]
    together = {}
    threads = [
        threading.Thread(target=lambda s=seed: together.update({s: say(client, "Shall we go?", seed=s,
                                                                       max_audio_length_ms=800)[0]}))
        for seed in (3, 4)
    ]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert health(server)["engine"]["batched_steps"] > before  # they shared frame steps
    assert metric(server, "csm_engine_batched_steps_total") == health(server)["engine"]["batched_steps"]
    assert together == alone and alone[3] != alone[4]


def metrics(server) -> dict[tuple[str, tuple], float]:
    """`/metrics` (no key needed), parsed by prometheus_client: {(sample name, sorted labels): value}."""
    response = httpx.get(f"{server}/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}  # fmt: skip


def metric(server, name: str, **labels) -> float:
    return metrics(server).get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_and_request_log(server, serve_log, client):
    before = metrics(server)
    _, headers = say(client, "Counting.")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()
    after = metrics(server)

    def grew(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    deadline = time.monotonic() + 10  # a request is counted once its response has been sent: poll
    while not (grew("csm_requests_total", method="GET", route="/v1/models", status="401")
               and grew("csm_real_time_factor_count")):  # fmt: skip
        assert time.monotonic() < deadline, "the requests were not counted"
        time.sleep(0.1)
        after = metrics(server)
    assert grew("csm_requests_total", method="POST", route="/v1/audio/speech", status="200") == 1
    assert grew("csm_requests_total", method="GET", route="/v1/models", status="401") == 1  # refused, yet counted
    assert grew("csm_time_to_first_audio_seconds_count") == 1 and grew("csm_real_time_factor_count") == 1
    assert grew("csm_audio_seconds_total") == pytest.approx(0.4)  # 5 frames of 80 ms
    assert grew("csm_engine_step_rows_total") >= grew("csm_engine_steps_total") >= 5
    assert grew("csm_prefix_cache_hits_total") + grew("csm_prefix_cache_misses_total") == 1  # alloy's turn
    assert after[("csm_queue_depth", ())] == 0 and after[("csm_running_requests", ())] == 0

    request_id = headers["x-request-id"]
    assert request_id.startswith("req_")
    deadline = time.monotonic() + 10  # the line is written once the response has been sent
    while not (lines := [json.loads(line) for line in serve_log.read_text().splitlines() if request_id in line]):
        assert time.monotonic() < deadline, "no log line for the request"
        time.sleep(0.1)
    (line,) = lines
    assert line["logger"] == "serve.access" and line["level"] == "INFO"
    assert (line["method"], line["route"], line["status"], line["voice"]) == ("POST", "/v1/audio/speech", 200, "alloy")
    assert (line["frames"], line["ended"], line["audio_s"]) == (5, "max_frames", 0.4)
    assert 0 < line["first_audio_s"] <= line["duration_s"] and line["rtf"] > 0


@pytest.mark.parametrize(
    ("request_body", "param", "message"),
    [
        ({"input": "x" * 4097}, "input", "at most 4096"),
        ({"response_format": "ogg"}, "response_format", "response_format"),
        ({"voice": "nobody"}, "voice", "voice 'nobody' not found"),
        ({"voice": {"id": "voice_../../etc"}}, "voice", "not found"),
        ({"speed": 1.5}, "speed", "only 1.0"),
        ({"model": "gpt-5"}, "model", "model 'gpt-5' not found"),
        ({"max_audio_length_ms": 10**7}, "max_audio_length_ms", "at most"),
        ({"tempreature": 0.5}, "tempreature", "Extra inputs"),
        ({"context": [{"text": "hi", "audio": "not base64!"}]}, "context.0.audio", "not base64"),
        ({"context": [{"text": "hi", "audio": base64.b64encode(b"just text " * 200).decode()}]},
         "context.0.audio", "not_audio"),
    ],
)  # fmt: skip
def test_bad_speech_requests(server, request_body, param, message):
    body = {"model": "csm", "input": "Hello.", "voice": "alloy", **request_body}
    response = httpx.post(f"{server}/v1/audio/speech", json=body, headers=auth())
    status = 404 if param == "model" else 400
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"], error


def test_bad_uploads(server, client, clip):
    with pytest.raises(openai.BadRequestError, match="not_audio"):
        client.audio.voices.create(audio_sample=("x.wav", b"hello " * 500, "audio/wav"), consent="c", name="x")
    with pytest.raises(openai.BadRequestError, match="too_short"):
        client.audio.voices.create(audio_sample=("x.wav", clip.read_bytes()[:20_000], "audio/wav"), consent="c",
                                   name="x")  # fmt: skip
    big = io.BytesIO()
    sf.write(big, np.zeros(24_000 * 12, np.float32), 24_000, format="WAV", subtype="PCM_16")  # 0.55 MiB
    with pytest.raises(openai.APIStatusError, match="at most") as raised:
        client.audio.voices.create(audio_sample=("big.wav", big.getvalue(), "audio/wav"), consent="c", name="x")
    assert raised.value.status_code == 413
    huge = b"\0" * (2 << 20)  # over limits.max_body_mb=1
    response = httpx.post(f"{server}/v1/audio/voices", files={"audio_sample": huge}, data={"name": "x"}, headers=auth())
    assert response.status_code == 413 and "limit" in response.json()["error"]["message"]
    response = httpx.delete(f"{server}/v1/audio/voices/alloy", headers=auth())
    assert response.status_code == 400 and "built in" in response.json()["error"]["message"]
    assert httpx.delete(f"{server}/v1/audio/voices/voice_nope", headers=auth()).status_code == 404
    assert health(server)["status"] == "ok"  # nothing above hurt the server


def test_no_keys_no_public_bind(serve_checkpoint, tmp_path):
    command = [sys.executable, "-m", "serve", f"checkpoint={serve_checkpoint}", *SERVE_ARGS, "host=0.0.0.0"]
    env = {k: v for k, v in os.environ.items() if k != "CSM_SERVE_API_KEYS"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode != 0 and "refusing to listen on 0.0.0.0 without API keys" in done.stderr + done.stdout


def test_watermarked_server(serve_checkpoint, client, tmp_path):
    """watermark.model marks every response: the streamed answer equals the plain server's answer (same model,
    seed and voice) watermarked whole-clip; the detector, with random weights, refuses a verdict on it."""
    from serve.watermark import STREAM_TOLERANCE, Watermarker

    command = serve_command(serve_checkpoint, tmp_path / "voices", "watermark.model='random-init:seed=0'")
    process, url = start_server(command, tmp_path / "server.log")
    try:
        marked, headers = say(openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0), "Marked.")
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert "outputs are watermarked: " in (tmp_path / "server.log").read_text()
    plain, plain_headers = say(client, "Marked.")
    assert (headers["x-csm-watermark"], plain_headers["x-csm-watermark"]) == ("random-init:seed=0", "none")
    marked, plain = (np.frombuffer(data, "<i2") / 32768 for data in (marked, plain))
    expected = Watermarker.load("random-init:seed=0", "cpu").apply(plain)
    assert len(marked) == len(plain) == 5 * FRAME_SAMPLES  # the lookahead is flushed at the end
    # random weights speak at full scale: compare where pcm16 did not clip either answer
    unclipped = np.abs(plain) < 0.99
    assert unclipped.mean() > 0.1  # 20 % here: ~1900 samples
    assert np.abs(marked - expected)[unclipped].max() < STREAM_TOLERANCE + 2 / 32768  # + both answers' rounding
    assert np.sqrt(np.mean((marked - plain)[unclipped] ** 2)) > 5e-4  # the mark is there (RMS ~1e-3)

    sf.write(tmp_path / "marked.wav", marked, 24000)
    verdict = subprocess.run([sys.executable, "-m", "serve.watermark", "--model", "random-init:seed=0", "detect",
                              str(tmp_path / "marked.wav")], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert verdict.returncode == 2 and "randomly initialised" in verdict.stderr + verdict.stdout


def test_engine_batched_equals_alone(serve_checkpoint):
    """In process: jobs with prompts of different lengths, joining at different steps, get exactly the codes
    `csm_train.generate.generate` makes for each alone with the same seed."""
    import asyncio

    from csm_train.generate import Sampling, generate, prompt_frames
    from csm_train.layout import Segment
    from serve.engine import Engine

    model = CSM.from_pretrained(serve_checkpoint).eval()
    tokenizer, g = ByteTokenizer(), torch.Generator().manual_seed(0)
    context = [Segment(1, "Earlier words.", torch.randint(0, 2048, (32, 12), generator=g))]
    prompts = [prompt_frames(tokenizer, 32, "Hi.", 0, []), prompt_frames(tokenizer, 32, "Hello to you.", 0, context),
               prompt_frames(tokenizer, 32, "Hey.", 0, [])]  # fmt: skip
    samplings = [Sampling(max_frames=n, seed=seed) for n, seed in ((8, 1), (6, 2), (4, 1))]
    expected = []  # each alone, through csm_train.generate

    async def run():
        expected.extend(generate(model, [p], s).codes[0] for p, s in zip(prompts, samplings, strict=True))
        engine = Engine(model, queue_size=4, max_batch=4)
        jobs = [engine.submit(prompts[0], samplings[0], 60)]
        first = [chunk async for chunk in _take(jobs[0], 3)]
        # job 1's prompt (50 frames) is longer than job 0's batch has run: it starts the next batch, where job 2
        # (9 frames) joins it with its prompt at positions 41..49, and leaves first
        jobs += [engine.submit(p, s, 60) for p, s in zip(prompts[1:], samplings[1:], strict=True)]
        out = [torch.cat(first + [c async for c in jobs[0].chunks(100)], dim=1)]
        for job in jobs[1:]:
            out.append(torch.cat([c async for c in job.chunks(100)], dim=1))
        engine.close()
        return out, engine.stats()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the server runs here (torch_threads=1): on a loaded CPU, several times faster
    try:
        got, stats = asyncio.run(run())
    finally:
        torch.set_num_threads(threads)
    for codes, want in zip(got, expected, strict=True):
        assert torch.equal(codes, want)
    assert stats["batched_steps"] > 0 and stats["peak_batch"] >= 2


def test_engine_prefix_cache_equals_reading_the_whole_prompt(serve_checkpoint):
    """A voice turn read once and placed, keys rotated, where later prompts start: the same codes as each prompt
    generated alone without any cache (one miss at position 0, one miss placed mid-batch, one hit)."""
    import asyncio

    from csm_train.generate import Sampling, generate, prompt_frames
    from csm_train.layout import Segment, segment_frames
    from serve.engine import Engine

    model = CSM.from_pretrained(serve_checkpoint).eval()
    tokenizer, g = ByteTokenizer(), torch.Generator().manual_seed(1)
    voice = Segment(0, "A voice of mine.", torch.randint(0, 2048, (32, 20), generator=g))
    other = Segment(1, "Someone else, at length.", torch.randint(0, 2048, (32, 60), generator=g))
    prefix = len(segment_frames(voice, tokenizer, 32))
    first = prompt_frames(tokenizer, 32, "Hello.", 0, [other])  # no prefix; 88 frames: the batch runs from t=87
    voiced = [prompt_frames(tokenizer, 32, text, 0, [voice]) for text in ("Hi there.", "Good to see you.")]
    samplings = [Sampling(max_frames=12, seed=5), Sampling(max_frames=6, seed=6), Sampling(max_frames=6, seed=7)]

    async def run():
        alone = [generate(model, [p], s).codes[0] for p, s in zip([first, *voiced], samplings, strict=True)]
        engine = Engine(model, queue_size=4, max_batch=4, prefix_cache_mb=64)
        jobs = [engine.submit(first, samplings[0], 60)]
        head = [chunk async for chunk in _take(jobs[0], 2)]
        jobs.append(engine.submit(voiced[0], samplings[1], 60, prefix))  # a miss: read at 0, moved to t-L+1
        body = [chunk async for chunk in _take(jobs[1], 2)]
        jobs.append(engine.submit(voiced[1], samplings[2], 60, prefix))  # a hit, placed at another start
        out = [torch.cat(head + [c async for c in jobs[0].chunks(100)], dim=1),
               torch.cat(body + [c async for c in jobs[1].chunks(100)], dim=1),
               torch.cat([c async for c in jobs[2].chunks(100)], dim=1)]  # fmt: skip
        engine.close()
        return alone, out, engine.stats()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone, got, stats = asyncio.run(run())
    finally:
        torch.set_num_threads(threads)
    for codes, want in zip(got, alone, strict=True):
        assert torch.equal(codes, want)
    assert stats["prefix_cache"]["hits"] == 1 and stats["prefix_cache"]["misses"] == 1
    assert stats["prefix_cache"]["bytes"] > 0 and stats["peak_batch"] == 3


async def _take(job, n):
    """The first `n` frames of a job, one chunk each."""
    for _ in range(n):
        item = await job.outbox.get()
        yield item[:, None]


def test_idle_conversations_expire():
    from csm_train.layout import Segment
    from serve.conversations import Conversations

    conversations = Conversations(ByteTokenizer(), max_frames=100, ttl_seconds=0.3, max_conversations=2)
    turn = Segment(0, "Hi.", torch.zeros(32, 4, dtype=torch.long))
    for name in ("a", "b", "c"):
        conversations.append(name, turn)
    assert conversations.history("a") == [] and len(conversations.history("c")) == 1  # the least recent went
    assert [conversations.append("c", turn) for _ in range(12)][-1] == 7  # 13 positions a turn: 7 fit in 100
    time.sleep(0.4)
    assert len(conversations) == 0 and conversations.history("c") == []


WRITER = """
import sys, numpy as np
from serve.voices import VoiceStore
store = VoiceStore(sys.argv[1], "random-init:seed=0")
codes = np.random.default_rng(0).integers(0, 2048, (32, 2000))
print("ready", flush=True)
while True:
    store.add("loop", "words " * 100, codes)
"""


def test_sigkill_mid_write_leaves_the_voice_store_readable(tmp_path):
    from serve.voices import VoiceStore

    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "ready"
    threading.Event().wait(1.0)
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    store = VoiceStore(tmp_path, "random-init:seed=0")  # a restart
    voices = store.list()
    assert voices and all(v.codes.shape == (32, 2000) and v.transcript for v in voices)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(v.id for v in voices)  # no half-written leftovers
