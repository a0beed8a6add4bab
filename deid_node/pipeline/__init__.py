"""One series through the stages: conditions -> deid.pixels -> deid.tags -> residual scan -> write.

Shared by the node, the batch CLI and the Python API; nothing here knows where files came from
or where they go next. The per-file work (`deidentify_file`) is a plain picklable function so
that it runs in worker processes (`deid_node.workers`): each process builds its pseudonymizer and
OCR model once.

- dicomfile.py: reading DICOM files (header only, or whole; without a preamble too) and writing
  them, native pixel data streamed or in one write;
- judge.py: stage 1, on headers only: save conditions per file, the series judged as a whole;
- deidentify.py: stage 2, one file (in a worker process): pixels, header, residue, output;
- series.py: `run_series`, which runs both, builds every file's report and the series' summary.
"""

from deid_node.log import quiet_pydicom
from deid_node.pipeline.deidentify import (
    DeidJob,
    DeidOutcome,
    PipelineSettings,
    _pseudonymizer,
    deidentify_file,
    pseudonymizer_for,
)
from deid_node.pipeline.dicomfile import (
    PIXEL_DATA_TAG,
    STREAM_VALUES_ABOVE,
    UID_PATTERN,
    _detach_pixel_bytes,
    _detach_pixel_data,
    _save,
    read_dicom,
    read_header,
)
from deid_node.pipeline.judge import (
    ENCAPSULATED_DOCUMENT_CLASSES,
    ENCAPSULATED_DOCUMENT_TAG,
    FileEvaluation,
    SourceFile,
    evaluate_file,
    is_encapsulated_document,
    judge_series,
)
from deid_node.pipeline.series import (
    OCR_SECONDS_BUCKETS,
    WITHHELD_CONDITIONS,
    WITHHELD_QUARANTINE,
    FileResult,
    SeriesOutcome,
    _file_result,
    run_series,
    seconds_histogram,
)

quiet_pydicom()  # worker processes import this package; they never configure logging

__all__ = [
    "ENCAPSULATED_DOCUMENT_CLASSES",
    "ENCAPSULATED_DOCUMENT_TAG",
    "OCR_SECONDS_BUCKETS",
    "PIXEL_DATA_TAG",
    "STREAM_VALUES_ABOVE",
    "UID_PATTERN",
    "WITHHELD_CONDITIONS",
    "WITHHELD_QUARANTINE",
    "DeidJob",
    "DeidOutcome",
    "FileEvaluation",
    "FileResult",
    "PipelineSettings",
    "SeriesOutcome",
    "SourceFile",
    "deidentify_file",
    "evaluate_file",
    "is_encapsulated_document",
    "judge_series",
    "pseudonymizer_for",
    "read_dicom",
    "read_header",
    "run_series",
    "seconds_histogram",
    # Used by tests and scripts/bench.py as deid_node.pipeline.<name>.
    "_detach_pixel_bytes",
    "_detach_pixel_data",
    "_file_result",
    "_pseudonymizer",
    "_save",
]
