"""Raw conversational audio → webdataset shards (VAD, ASR, diarization, Mimi codes). Built in issue #4."""
