"""structlog set-up: JSON lines when stderr is not a terminal, a readable console when it is.

Log only UIDs, counts, states, AE titles and paths under the data dir. Never a tag value of the
patient: callers bind `series_uid`, `calling_ae`, never names, IDs or dates.
"""

from __future__ import annotations

import logging
import sys

import structlog

_configured = False


def configure_logging(level: str = "info", *, json: bool | None = None) -> None:
    """Configure structlog once per process; `json=None` picks JSON when not on a terminal."""
    global _configured
    use_json = (not sys.stderr.isatty()) if json is None else json
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            # Exceptions are rendered as type and our own message only: a library's message can
            # quote a tag value, so tracebacks are not printed to the log.
            _exception_summary,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=_StderrLogger,
        cache_logger_on_first_use=False,
    )
    # pynetdicom logs through stdlib logging; its DEBUG output dumps datasets (patient values).
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    quiet_pydicom()
    _configured = True


class _StderrLogger:
    """Writes each line to the current sys.stderr (looked up per line, so that a redirected or
    replaced stderr, as under pytest or a daemon wrapper, is honoured)."""

    def __init__(self, *_args: object) -> None:
        pass

    def msg(self, message: str) -> None:
        stream = sys.stderr
        stream.write(message + "\n")
        stream.flush()

    log = debug = info = warning = warn = error = critical = exception = fatal = msg


def _exception_summary(_logger: object, _name: str, event: dict) -> dict:
    exc = event.pop("exc_info", None)
    if exc:
        error = sys.exc_info()[1] if exc is True else (exc[1] if isinstance(exc, tuple) else exc)
        if isinstance(error, BaseException):
            event["error_type"] = type(error).__name__
    return event


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    if not _configured:
        configure_logging()
    return structlog.get_logger(name)


def safe_error(exc: BaseException) -> dict[str, str]:
    """Log fields for an exception: its type always; its message only when it cannot hold a
    patient value (our own errors are written without them; OS errors name paths under the
    data dir). A library's message may quote a tag value, so it is left out."""
    from deid_node.errors import DeidNodeError

    fields = {"error_type": type(exc).__name__}
    if isinstance(exc, DeidNodeError | OSError):
        fields["error"] = str(exc)[:300]
    return fields


def quiet_pydicom() -> None:
    """pydicom's validation warnings quote the offending value ("Invalid value for VR DA:
    '1970-05-17'"): a patient value on stderr. Values are accepted as sent and the pipeline
    judges them; nothing of pydicom's is printed. Called in every process that reads DICOM."""
    import pydicom.config

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
