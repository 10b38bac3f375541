"""`python -m serve checkpoint=…`: an OpenAI-compatible speech server for any checkpoint eval reads.

One module per concern: `api.py` (the routes, OpenAI's request and response shapes), `engine.py` (the scheduler
that owns the model and runs generation), `context.py` (voice, context and conversation turns fitted into the
backbone's context), `voices.py` (voice profiles on disk), `conversations.py` (conversation memory),
`encode.py` (24 kHz audio → wav/pcm/flac/mp3/opus/aac, chunk by chunk), `security.py` (API keys, the bind rule,
size limits), `errors.py` (OpenAI's error shape), `app.py` (everything built from the config).
"""
