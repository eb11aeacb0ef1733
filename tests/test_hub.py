"""Loading a Hugging Face tokenizer or model never waits on a hub it cannot reach."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from fastserve.procs import free_port

LOAD = """
import json, sys, time
from fastserve.model_spec import resolve_model
from fastserve.tokenizer import load_tokenizer
out = {}
for name in sys.argv[1:]:
    started = time.monotonic()
    tokenizer = load_tokenizer(name)
    out[name] = [type(tokenizer).__name__, time.monotonic() - started]
started = time.monotonic()
try:
    resolve_model(sys.argv[1])
except ValueError as exc:
    out["model"] = [str(exc), time.monotonic() - started]
print(json.dumps(out))
"""


def save_word_tokenizer(path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    inner = Tokenizer(models.WordLevel({"</s>": 0, "<unk>": 1, "hello": 2}, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=inner, eos_token="</s>", unk_token="<unk>").save_pretrained(path)


def test_unreachable_hub_costs_no_retries_and_a_local_directory_no_hub_at_all(tmp_path):
    save_word_tokenizer(tmp_path / "tok")
    env = {
        **os.environ,
        "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}",  # nothing listens: the hub is unreachable
        "HF_HOME": str(tmp_path / "hf-home"),  # an empty cache
    }
    env.pop("HF_HUB_OFFLINE", None)
    done = subprocess.run(
        [sys.executable, "-c", LOAD, "facebook/opt-125m", str(tmp_path / "tok")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout)
    kind, seconds = loaded["facebook/opt-125m"]
    # bounds with room for a loaded machine: the failure they catch was ~50 s of retries with backoff
    assert kind == "ByteTokenizer" and seconds < 30, loaded
    kind, seconds = loaded[str(tmp_path / "tok")]
    assert kind == "HFTokenizer" and seconds < 30, loaded
    error, seconds = loaded["model"]  # a hub id that is not in the cache: a clear error, at once
    assert "could not be downloaded from the Hugging Face hub" in error and seconds < 30, loaded
