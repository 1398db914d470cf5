"""The web UI and the /sdapi/v1 HTTP API (`nanodiff serve`).

Status codes, one rule for every route (the body is always the web UI's error shape {"error": kind,
"detail": "one line", "body": "", "errors": "STATUS: one line"}, server/errors.py):
- 422: the request itself is wrong, found before any generation runs: a field's type or range, JSON values no
  field may hold (NaN, Infinity, unpaired surrogates), an image that does not decode, prompt syntax (emphasis
  and `<lora:>` tags), a LoRA the folder lacks, an option the model cannot take.
- 400: a well-formed request the pipeline refused while running it (a NanoDiffusionError from the model, e.g.
  sampling diverged to NaN), and a malformed HTTP request.
- 401 / 403 / 404 / 408 / 413 / 429: authentication, guards (host, origin), unknown job, a body that stalls,
  a body too large, a full queue.
- 501: a web UI feature this server has no model for (interrogate).
- 500 only for a bug; its message names no file, the log has the traceback.
Messages never name the server's own folders (server/errors.py).
"""
