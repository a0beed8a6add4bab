"""The configuration as frozen dataclasses, one a section; option names the sections accept."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from deid_node.conditions import SaveDeidentifiedDicomCondition
from deid_node.errors import ConfigError
from deid_node.modes import (  # noqa: F401 (re-exported)
    DEFAULT_PROJECT,
    OCR_ENGINES,
    PROFILE_OPTIONS,
    DeidentifyRedactTextMode,
    SeriesPolicy,
)


@dataclass(frozen=True)
class TlsConfig:
    """TLS for the SCP: our certificate and key; with `ca`, peers must present a certificate
    signed by it (mutual TLS, as the DICOM Secure Transport Connection Profile expects)."""

    cert: Path
    key: Path
    ca: Path | None = None


@dataclass(frozen=True)
class NodeConfig:
    ae_title: str = "DEID_NODE"
    host: str = "0.0.0.0"
    port: int = 11112
    data_dir: Path = Path("var")
    allowed_calling_aets: tuple[str, ...] = ()
    # Refuse (0xA700) instances larger than this, and any instance when free disk is below.
    max_instance_mb: int = 2048
    min_free_disk_mb: int = 1024
    # Refuse (0xA700) an instance whose pixels would decode to more than this
    # (Rows x Columns x SamplesPerPixel x bytes per sample x NumberOfFrames), compressed or not.
    max_decoded_mb: int = 2048
    # Network limits, enforced on the bytes as they arrive (scp/server.py, scp/limits.py).
    # Largest P-DATA-TF PDU we announce and accept (a longer one aborts the association).
    max_pdu_kb: int = 256
    # Per association: bytes and seconds (0: no limit); past either it is aborted.
    max_association_mb: int = 102400
    max_association_seconds: float = 14400.0
    # Associations at once (counted from a complete A-ASSOCIATE-RQ; more are rejected).
    max_associations: int = 32
    # Connections that have not sent their A-ASSOCIATE-RQ yet (TLS handshake included): each
    # is closed after association_request_timeout_seconds, the oldest first past the cap.
    max_pending_connections: int = 64
    association_request_timeout_seconds: float = 10.0
    # Threads that run series through the pipeline, off the SCP's association threads.
    workers: int = 2
    # Keep originals in the spool this long after their series left or was rejected.
    retention_hours: float = 0.0
    # Seconds between looks at the database for complete series and due deliveries.
    poll_seconds: float = 1.0
    network_timeout_seconds: float = 60.0
    # Calling AE -> source networks (CIDR) it may connect from; AEs not listed: any address.
    allowed_peers: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    tls: TlsConfig | None = None
    # Unique per replica sharing a PostgreSQL store; default hostname:port.
    replica_id: str = ""


@dataclass(frozen=True)
class SeriesConfig:
    stable_seconds: float = 30.0
    policy: SeriesPolicy = SeriesPolicy.ALL


@dataclass(frozen=True)
class DeidConfig:
    redact_dicom_tags: bool = True
    redact_pixels_mode: DeidentifyRedactTextMode = DeidentifyRedactTextMode.REDACT_ALL_TEXT
    profile_options: tuple[str, ...] = ()
    patient_id_prefix: str = "DEID"
    # Optional CSV "original_id,research_id": pseudonyms from the table instead of the HMAC.
    lookup_table: Path | None = None
    # Text written into DeidentificationMethod (0012,0063).
    method_description: str = "deid-node PS3.15 Basic Application Level Confidentiality Profile"
    # Encapsulated PDF/CDA/STL/OBJ/MTL: their document cannot be de-identified here. "quarantine"
    # holds them (and, under policy "all", their series) back; "remove" drops them from the series.
    encapsulated_documents: Literal["quarantine", "remove"] = "quarantine"


@dataclass(frozen=True)
class RegionTemplate:
    """A fixed region to blank for a device, as CTP's pixel anonymizer does: x, y, width, height."""

    manufacturer: str
    model: str
    rows: int | None
    columns: int | None
    regions: tuple[tuple[int, int, int, int], ...]


@dataclass(frozen=True)
class PixelsConfig:
    ocr_engine: Literal["rapidocr", "easyocr"] = "rapidocr"
    # Where OCR runs: "auto" is a CUDA GPU when the engine can use one (EasyOCR: torch sees a
    # GPU; RapidOCR: onnxruntime-gpu starts on one), else the CPU; "cuda" without one fails at
    # start-up (deid_node.ocr.check_engine).
    device: Literal["auto", "cpu", "cuda"] = "auto"
    margin_px: int = 4
    # Longest image side used for text detection; larger images are downscaled to it.
    max_detect_side: int = 1600
    # A file whose redaction would change more than this share of a frame's pixels is
    # quarantined for review: anatomy taken for text, or a screen of text.
    max_redacted_fraction: float = 0.05
    templates: tuple[RegionTemplate, ...] = ()


@dataclass(frozen=True)
class DestinationConfig:
    name: str
    type: Literal["dicom", "folder", "dicomweb"]
    ae_title: str = ""
    host: str = ""
    port: int = 0
    path: Path | None = None
    calling_ae_title: str = ""  # defaults to node.ae_title
    tls_ca: Path | None = None  # set to use TLS: the CA that signed the destination's certificate
    tls_cert: Path | None = None  # our client certificate and key, when the destination asks
    tls_key: Path | None = None
    max_attempts: int = 10
    backoff_initial_seconds: float = 5.0
    backoff_max_seconds: float = 600.0
    timeout_seconds: float = 30.0
    # While down, the destination is asked C-ECHO at most this far apart (0.5 s, doubling up
    # to it); its first answer makes every waiting delivery due at once.
    probe_max_seconds: float = 5.0
    # dicomweb (STOW-RS): instances are POSTed to {base_url}/studies. The config file holds
    # no secret: a password or token is read from the environment (or a token file).
    base_url: str = ""  # the `url` key (the method below keeps that name)
    auth: Literal["none", "basic", "bearer"] = "none"
    username: str = ""
    password_env: str = ""
    token_env: str = ""
    token_file: Path | None = None
    instances_per_request: int = 50
    ca_file: Path | None = None  # a private CA for https; public CAs are verified by default

    def url(self) -> str:
        if self.type == "folder":
            return str(self.path)
        if self.type == "dicomweb":
            return self.base_url
        return f"dicom://{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class SourceConfig:
    """A PACS to pull studies from (`deid-node pull`, deid_node/pull.py): C-FIND, then C-MOVE
    to the node's own AE title (the PACS must know it) or C-GET."""

    name: str
    ae_title: str
    host: str
    port: int
    retrieve: Literal["move", "get"] = "move"
    max_concurrent: int = 2
    pause_seconds: float = 0.0


@dataclass(frozen=True)
class ConsoleConfig:
    """The operator console and /metrics, /healthz (deid_node/console); off unless enabled."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 8080
    users_file: Path = Path("var/console-users.toml")
    tls_cert: Path | None = None
    tls_key: Path | None = None


@dataclass(frozen=True)
class StoreConfig:
    """Where the node's state lives: "sqlite" (embedded in node.data_dir, one node) or
    "postgresql" (replicas sharing one database and `shared_dir` for spool, outputs and
    quarantine). The URL holds no password: PGPASSWORD or ~/.pgpass."""

    backend: Literal["sqlite", "postgresql"] = "sqlite"
    url: str = ""
    shared_dir: Path | None = None
    lease_seconds: float = 30.0


@dataclass(frozen=True)
class ProjectConfig:
    """One research project: which associations and instances it takes, its own rules, secret
    and destinations. Its sections are complete: unset keys were filled from the top level."""

    name: str
    called_ae_titles: tuple[str, ...]
    calling_ae_titles: tuple[str, ...] = ()  # empty: any calling AE that [node] allows
    destinations: tuple[str, ...] = ()
    match: tuple[SaveDeidentifiedDicomCondition, ...] = ()  # empty: every instance
    series: SeriesConfig = field(default_factory=SeriesConfig)
    deid: DeidConfig = field(default_factory=DeidConfig)
    pixels: PixelsConfig = field(default_factory=PixelsConfig)
    save_conditions: tuple[SaveDeidentifiedDicomCondition, ...] = ()
    # Projects naming the same secret derive the same UIDs and pseudonyms (linkable); the
    # default is the project's own name. "default" is the installation secret, secret.key.
    secret_name: str = ""

    @property
    def secret(self) -> str:
        return self.secret_name or self.name

    def accepts_association(self, called_ae: str, calling_ae: str) -> bool:
        return called_ae.strip() in self.called_ae_titles and (
            not self.calling_ae_titles or calling_ae.strip() in self.calling_ae_titles
        )


@dataclass(frozen=True)
class Config:
    node: NodeConfig = field(default_factory=NodeConfig)
    series: SeriesConfig = field(default_factory=SeriesConfig)
    deid: DeidConfig = field(default_factory=DeidConfig)
    pixels: PixelsConfig = field(default_factory=PixelsConfig)
    save_conditions: tuple[SaveDeidentifiedDicomCondition, ...] = ()
    destinations: tuple[DestinationConfig, ...] = ()
    source: Path | None = None
    console: ConsoleConfig = field(default_factory=ConsoleConfig)
    sources: tuple[SourceConfig, ...] = ()
    # As written in [[projects]]; none: one implicit project (all_projects).
    projects: tuple[ProjectConfig, ...] = ()
    store: StoreConfig = field(default_factory=StoreConfig)

    @property
    def all_projects(self) -> tuple[ProjectConfig, ...]:
        """The projects the node runs: those configured, else the implicit `default` one made
        of the top-level sections (today's single pipeline, UIDs unchanged)."""
        if self.projects:
            return self.projects
        return (
            ProjectConfig(
                name=DEFAULT_PROJECT,
                called_ae_titles=(self.node.ae_title,),
                destinations=tuple(d.name for d in self.destinations),
                series=self.series,
                deid=self.deid,
                pixels=self.pixels,
                save_conditions=self.save_conditions,
            ),
        )

    def project(self, name: str) -> ProjectConfig:
        for project in self.all_projects:
            if project.name == name:
                return project
        known = ", ".join(p.name for p in self.all_projects)
        raise ConfigError(f"--project: no project {name!r} in the config (known: {known})")

    @property
    def data_dir(self) -> Path:
        return self.node.data_dir

    @property
    def files_dir(self) -> Path:
        """Where spool, outputs, quarantine and secrets live: node.data_dir, or with a
        PostgreSQL store the folder every replica shares."""
        return self.store.shared_dir or self.node.data_dir

    @property
    def db_path(self) -> Path:
        return self.node.data_dir / "deid-node.sqlite"
