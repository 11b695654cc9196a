"""Log setup: readable lines for a terminal, or one JSON object a line for log shippers.

Log messages name requests by id and counts only; forget data (sample contents, texts) is never logged.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings

from daemon.config import Logging


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": self.formatTime(record), "level": record.levelname, "logger": record.name,
               "msg": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(cfg: Logging) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if cfg.json_format else
                         logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(cfg.level)
    # kafka-python logs every reconnect attempt at WARNING/ERROR; the daemon reports the state once itself.
    logging.getLogger("kafka").setLevel(logging.CRITICAL if cfg.level != "DEBUG" else logging.DEBUG)
    logging.captureWarnings(True)  # library warnings become log lines, in the same format (JSON when configured)
    if cfg.level != "DEBUG":
        # faiss's loader logs each CPU-specific build it does not find, with a ModuleNotFoundError, at INFO;
        # FutureWarnings and deprecation notices are libraries telling developers about their own coming API
        # changes. None is something an operator can act on; all read like errors. DEBUG shows them again.
        logging.getLogger("faiss.loader").setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", category=FutureWarning)
        # transformers logs its deprecation notices through a handler of its own ("[transformers] ..."); read
        # when transformers is first imported, which is after this
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
