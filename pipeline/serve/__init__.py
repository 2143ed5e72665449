"""``pipe serve``: a loaded run answering over HTTP (:mod:`pipeline.serve.app`), with its page."""
