"""The exception tree of deid-node: every error we raise on purpose is a DeidNodeError.

Messages never carry patient-identifying values; UIDs, file paths and config keys only.
"""


class DeidNodeError(Exception):
    """Base of every error deid-node raises deliberately."""


class ConfigError(DeidNodeError):
    """The configuration is invalid; the message names the offending key."""


class DataDirInUseError(DeidNodeError):
    """Another process holds the lock on the data folder (a second node on the same folder)."""


class InputError(DeidNodeError):
    """An input instance or file cannot be processed (corrupt, missing UIDs, unsupported)."""


class ConditionError(DeidNodeError):
    """A save condition is malformed (unknown type, bad tag, bad regex)."""


class DeidentificationError(DeidNodeError):
    """De-identification could not be completed safely; the file must not leave."""


class ResidualIdentifierError(DeidentificationError):
    """The residual scan found an identifying value of the original in the output."""


class PixelError(DeidentificationError):
    """Pixel data could not be decoded, redacted or re-encoded."""


class ForwardError(DeidNodeError):
    """A destination refused, failed or could not be reached."""


class DestinationUnreachableError(ForwardError):
    """No connection, an abort or no answer: the destination (or the way to it) is down."""


class UnsupportedSchemeError(InputError):
    """A dicom_url uses a scheme the API cannot read (s3://, gs://, ...)."""
