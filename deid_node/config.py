"""Configuration: TOML -> frozen dataclasses, validated once at start-up.

Every error names the offending key (`node.port`, `destinations[0].host`, ...). Relative paths
(data_dir, folder destinations, lookup tables) resolve against the working directory of the
process, and are made absolute here so that the rest of the code never depends on it.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from deid_node.conditions import SaveDeidentifiedDicomCondition, parse_conditions
from deid_node.errors import ConditionError, ConfigError
from deid_node.modes import DEFAULT_PROJECT, DeidentifyRedactTextMode, SeriesPolicy

PROFILE_OPTIONS = (
    "Retain Safe Private",
    "Retain UIDs",
    "Retain Device Identity",
    "Retain Institution Identity",
    "Retain Patient Characteristics",
    "Retain Longitudinal Temporal Information Full Dates",
    "Retain Longitudinal Temporal Information Modified Dates",
    "Clean Descriptors",
    "Clean Structured Content",
    "Clean Graphics",
)
OCR_ENGINES = ("rapidocr", "easyocr")
_PROJECT_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")


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


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML config file; raise ConfigError naming the bad key."""
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {source}: {exc.strerror}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    return parse_config(raw, source=source)


def parse_config(raw: Mapping[str, Any], source: Path | None = None) -> Config:
    _reject_unknown(
        raw,
        {
            "node",
            "series",
            "deid",
            "pixels",
            "save_conditions",
            "destinations",
            "console",
            "sources",
            "projects",
            "store",
        },
        "",
    )
    if not isinstance(raw.get("node", {}), Mapping):
        raise ConfigError("node: expected a table")
    node_raw = dict(raw.get("node", {}))
    peers = _parse_allowed_peers(node_raw.pop("allowed_peers", {}))
    tls = _parse_tls(node_raw.pop("tls", None))
    node = _section(NodeConfig, node_raw, "node")
    node = _replace(node, allowed_peers=peers, tls=tls)
    if not node.ae_title or len(node.ae_title) > 16 or not node.ae_title.isascii():
        raise ConfigError("node.ae_title: must be 1-16 ASCII characters")
    _check_port(node.port, "node.port")
    for key in ("max_instance_mb", "min_free_disk_mb", "workers"):
        if getattr(node, key) < (1 if key == "workers" else 0):
            raise ConfigError(f"node.{key}: must be positive")
    _check_network_limits(node)
    node = _replace(node, data_dir=Path(node.data_dir).absolute())
    if not node.replica_id:
        import socket

        node = _replace(node, replica_id=f"{socket.gethostname()}:{node.port}")
    if len(node.replica_id) > 64 or not re.fullmatch(r"[A-Za-z0-9._:-]+", node.replica_id):
        raise ConfigError("node.replica_id: 1-64 characters of letters, digits, . _ : -")
    store = _parse_store(raw.get("store", {}))

    series = _parse_series(raw.get("series", {}), "series")
    deid = _parse_deid(raw.get("deid", {}), "deid")
    pixels = _parse_pixels(raw.get("pixels", {}))
    conditions = _parse_condition_list(_list(raw, "save_conditions"), "save_conditions")

    destinations = tuple(
        _parse_destination(entry, index, node)
        for index, entry in enumerate(_list(raw, "destinations"))
    )
    names = [d.name for d in destinations]
    if len(set(names)) != len(names):
        raise ConfigError("destinations: names must be unique")
    console = _parse_console(raw.get("console", {}))
    sources = tuple(
        _parse_source(entry, index) for index, entry in enumerate(_list(raw, "sources"))
    )
    if len({s.name for s in sources}) != len(sources):
        raise ConfigError("sources: names must be unique")
    config = Config(
        node, series, deid, pixels, conditions, destinations, source, console, sources=sources
    )
    projects = tuple(
        _parse_project(entry, index, raw, config)
        for index, entry in enumerate(_list(raw, "projects"))
    )
    if len({p.name for p in projects}) != len(projects):
        raise ConfigError("projects: names must be unique")
    return _replace(config, projects=projects, store=store)


def _parse_store(raw: Any) -> StoreConfig:
    store = _section(StoreConfig, raw, "store")
    if store.backend not in ("sqlite", "postgresql"):
        raise ConfigError(f"store.backend: {store.backend!r} is not one of sqlite, postgresql")
    if store.backend == "sqlite":
        for key in ("url", "shared_dir"):
            if getattr(store, key):
                raise ConfigError(f'store.{key}: only with backend = "postgresql"')
        return store
    if not store.url.startswith(("postgresql://", "postgres://")):
        raise ConfigError("store.url: required, postgresql://user@host:port/database")
    if "@" in store.url.split("://", 1)[1] and ":" in store.url.split("://", 1)[1].split("@")[0]:
        raise ConfigError(
            "store.url: no password in the URL (PGPASSWORD in the environment or ~/.pgpass)"
        )
    if store.shared_dir is None:
        raise ConfigError(
            'store.shared_dir: required with backend = "postgresql" (a folder every replica'
            " mounts: spool, outputs, quarantine, secrets)"
        )
    if store.lease_seconds < 2:
        raise ConfigError("store.lease_seconds: must be >= 2")
    return _replace(store, shared_dir=Path(store.shared_dir).absolute())


def _parse_series(raw: Any, label: str) -> SeriesConfig:
    series = _section(SeriesConfig, raw, label)
    if series.stable_seconds < 0:
        raise ConfigError(f"{label}.stable_seconds: must be >= 0")
    return series


def _parse_deid(raw: Any, label: str) -> DeidConfig:
    deid = _section(DeidConfig, raw, label)
    for option in deid.profile_options:
        if option not in PROFILE_OPTIONS:
            raise ConfigError(
                f"{label}.profile_options: unknown option {option!r};"
                f" known: {', '.join(PROFILE_OPTIONS)}"
            )
    if {PROFILE_OPTIONS[5], PROFILE_OPTIONS[6]} <= set(deid.profile_options):
        raise ConfigError(f"{label}.profile_options: choose Full Dates or Modified Dates, not both")
    if deid.encapsulated_documents not in ("quarantine", "remove"):
        raise ConfigError(
            f"{label}.encapsulated_documents: {deid.encapsulated_documents!r} is not one of "
            "quarantine, remove"
        )
    if len(deid.patient_id_prefix) > 48 or "\\" in deid.patient_id_prefix:
        raise ConfigError(f"{label}.patient_id_prefix: at most 48 characters, no backslash")
    if deid.lookup_table is not None:
        deid = _replace(deid, lookup_table=Path(deid.lookup_table).absolute())
    return deid


def _parse_condition_list(raw: list[Any], label: str) -> tuple[SaveDeidentifiedDicomCondition, ...]:
    try:
        return tuple(parse_conditions(raw, label))
    except ConditionError as exc:
        raise ConfigError(str(exc)) from None


def _inherited(raw: Mapping[str, Any], entry: Mapping[str, Any], key: str, label: str) -> dict:
    """A project's section: the top-level table with the project's keys over it."""
    top, own = raw.get(key, {}), entry.get(key, {})
    for table, name in ((top, key), (own, f"{label}.{key}")):
        if not isinstance(table, Mapping):
            raise ConfigError(f"{name}: expected a table")
    return {**top, **own}


def _parse_project(entry: Any, index: int, raw: Mapping[str, Any], config: Config) -> ProjectConfig:
    label = f"projects[{index}]"
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{label}: expected a table")
    _reject_unknown(
        entry,
        {
            "name",
            "called_ae_titles",
            "calling_ae_titles",
            "destinations",
            "match",
            "series",
            "deid",
            "pixels",
            "save_conditions",
            "secret_name",
        },
        label,
    )
    name = entry.get("name")
    if not isinstance(name, str) or not _PROJECT_NAME.match(name):
        raise ConfigError(f"{label}.name: required, 1-64 characters of a-z, 0-9 and -")
    titles = {}
    for key, default in (
        ("called_ae_titles", [config.node.ae_title]),
        ("calling_ae_titles", []),
    ):
        values = _coerce(entry.get(key, default), "tuple[str, ...]", f"{label}.{key}")
        for title in values:
            if not title.strip() or len(title.strip()) > 16 or not title.isascii() or "\\" in title:
                raise ConfigError(f"{label}.{key}: {title!r} is not an AE title (1-16 ASCII)")
        titles[key] = tuple(t.strip() for t in values)
    if not titles["called_ae_titles"]:
        raise ConfigError(f"{label}.called_ae_titles: at least one AE title")
    if "destinations" not in entry:
        raise ConfigError(f"{label}.destinations: required (names of [[destinations]])")
    destinations = _coerce(entry["destinations"], "tuple[str, ...]", f"{label}.destinations")
    known = {d.name for d in config.destinations}
    for dest in destinations:
        if dest not in known:
            raise ConfigError(
                f"{label}.destinations: no destination named {dest!r}"
                f" (known: {', '.join(sorted(known)) or 'none'})"
            )
    secret_name = entry.get("secret_name", "")
    if secret_name and (not isinstance(secret_name, str) or not _PROJECT_NAME.match(secret_name)):
        raise ConfigError(f"{label}.secret_name: 1-64 characters of a-z, 0-9 and -")
    if not isinstance(entry.get("match", []), list):
        raise ConfigError(f"{label}.match: expected an array of conditions")
    own_conditions = _list(entry, "save_conditions") if "save_conditions" in entry else []
    return ProjectConfig(
        name=name,
        called_ae_titles=titles["called_ae_titles"],
        calling_ae_titles=titles["calling_ae_titles"],
        destinations=destinations,
        match=_parse_condition_list(entry.get("match", []), f"{label}.match"),
        series=_parse_series(_inherited(raw, entry, "series", label), f"{label}.series"),
        deid=_parse_deid(_inherited(raw, entry, "deid", label), f"{label}.deid"),
        pixels=_parse_pixels(_inherited(raw, entry, "pixels", label), f"{label}.pixels"),
        save_conditions=(
            _parse_condition_list(own_conditions, f"{label}.save_conditions")
            if own_conditions
            else config.save_conditions
        ),
        secret_name=secret_name,
    )


def _parse_source(entry: Any, index: int) -> SourceConfig:
    label = f"sources[{index}]"
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{label}: expected a table")
    for key in ("name", "ae_title", "host", "port"):
        if key not in entry:
            raise ConfigError(f"{label}.{key}: required")
    src = _section(SourceConfig, entry, label)
    if not src.name:
        raise ConfigError(f"{label}.name: must not be empty")
    if not src.ae_title or len(src.ae_title) > 16 or not src.ae_title.isascii():
        raise ConfigError(f"{label}.ae_title: must be 1-16 ASCII characters")
    if not src.host:
        raise ConfigError(f"{label}.host: must not be empty")
    _check_port(src.port, f"{label}.port")
    if src.retrieve not in ("move", "get"):
        raise ConfigError(f"{label}.retrieve: {src.retrieve!r} is not one of move, get")
    if src.max_concurrent < 1:
        raise ConfigError(f"{label}.max_concurrent: must be >= 1")
    if src.pause_seconds < 0:
        raise ConfigError(f"{label}.pause_seconds: must be >= 0")
    return src


def _parse_console(raw: Any) -> ConsoleConfig:
    console = _section(ConsoleConfig, raw, "console")
    _check_port(console.port, "console.port")
    if (console.tls_cert is None) != (console.tls_key is None):
        raise ConfigError("console.tls_cert: tls_cert and tls_key go together")
    for key in ("tls_cert", "tls_key"):
        path = getattr(console, key)
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"console.{key}: no such file {path}")
    paths = {
        key: Path(getattr(console, key)).absolute()
        for key in ("users_file", "tls_cert", "tls_key")
        if getattr(console, key) is not None
    }
    return _replace(console, **paths)


def _parse_allowed_peers(raw: Any) -> dict[str, tuple[str, ...]]:
    if not isinstance(raw, Mapping):
        raise ConfigError("node.allowed_peers: expected a table AE = [CIDR, ...]")
    peers: dict[str, tuple[str, ...]] = {}
    for ae, networks in raw.items():
        key = f"node.allowed_peers.{ae}"
        if not isinstance(networks, list) or not networks:
            raise ConfigError(f'{key}: expected a non-empty list of networks such as "10.0.0.0/24"')
        for network in networks:
            try:
                ipaddress.ip_network(str(network), strict=False)
            except ValueError:
                raise ConfigError(f"{key}: {network!r} is not an IP network") from None
        peers[str(ae).strip()] = tuple(str(n) for n in networks)
    return peers


def _parse_tls(raw: Any) -> TlsConfig | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ConfigError("node.tls: expected a table with cert, key and optionally ca")
    for key in ("cert", "key"):
        if key not in raw:
            raise ConfigError(f"node.tls.{key}: required when [node.tls] is present")
    tls = _section(TlsConfig, raw, "node.tls")
    tls = _replace(tls, **{k: Path(v).absolute() for k, v in vars(tls).items() if v is not None})
    for key, path in vars(tls).items():
        if path is not None and not path.is_file():
            raise ConfigError(f"node.tls.{key}: no such file {path}")
    return tls


def _parse_pixels(raw: Any, where: str = "pixels") -> PixelsConfig:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a table")
    templates_raw = raw.get("templates", [])
    rest = {k: v for k, v in raw.items() if k != "templates"}
    pixels = _section(PixelsConfig, rest, where)
    if pixels.ocr_engine not in OCR_ENGINES:
        raise ConfigError(f"{where}.ocr_engine: must be one of {', '.join(OCR_ENGINES)}")
    from deid_node.ocr import check_engine  # numpy only; engines are found, not imported

    # At start-up, not at the first image: EasyOCR without its extra, device "cuda" without a GPU.
    check_engine(pixels.ocr_engine, pixels.device, where)
    fraction = pixels.max_redacted_fraction
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction <= 1:
        raise ConfigError(f"{where}.max_redacted_fraction: expected a number in (0, 1], e.g. 0.05")
    pixels = _replace(pixels, max_redacted_fraction=float(fraction))
    templates = []
    for index, entry in enumerate(templates_raw):
        label = f"{where}.templates[{index}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{label}: expected a table")
        _reject_unknown(entry, {"manufacturer", "model", "rows", "columns", "regions"}, label)
        regions = entry.get("regions", [])
        if not regions or not all(
            isinstance(r, list) and len(r) == 4 and all(isinstance(v, int) and v >= 0 for v in r)
            for r in regions
        ):
            raise ConfigError(f"{label}.regions: expected a list of [x, y, width, height] integers")
        templates.append(
            RegionTemplate(
                manufacturer=str(entry.get("manufacturer", "")),
                model=str(entry.get("model", "")),
                rows=entry.get("rows"),
                columns=entry.get("columns"),
                regions=tuple(tuple(r) for r in regions),
            )
        )
    return _replace(pixels, templates=tuple(templates))


def _parse_destination(entry: Any, index: int, node: NodeConfig) -> DestinationConfig:
    label = f"destinations[{index}]"
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{label}: expected a table")
    for key in ("name", "type"):
        if key not in entry:
            raise ConfigError(f"{label}.{key}: required")
    if "base_url" in entry:
        raise ConfigError(f"{label}.base_url: unknown key (the base URL is `url`)")
    if not isinstance(entry.get("url", ""), str):
        raise ConfigError(f"{label}.url: expected a string")
    entry = {("base_url" if k == "url" else k): v for k, v in entry.items()}
    dest = _section(DestinationConfig, entry, label)
    if dest.type == "dicomweb":
        dest = _check_dicomweb(dest, label)
    elif dest.type == "dicom":
        if not dest.ae_title or len(dest.ae_title) > 16:
            raise ConfigError(
                f"{label}.ae_title: required for a dicom destination, 1-16 characters"
            )
        if not dest.host:
            raise ConfigError(f"{label}.host: required for a dicom destination")
        _check_port(dest.port, f"{label}.port")
        if not dest.calling_ae_title:
            dest = _replace(dest, calling_ae_title=node.ae_title)
    elif dest.type == "folder":
        if dest.path is None:
            raise ConfigError(f"{label}.path: required for a folder destination")
        dest = _replace(dest, path=Path(dest.path).absolute())
    else:
        raise ConfigError(
            f"{label}.type: must be 'dicom', 'dicomweb' or 'folder', not {dest.type!r}"
        )
    for key in ("tls_ca", "tls_cert", "tls_key"):
        path = getattr(dest, key)
        if path is not None:
            if not Path(path).is_file():
                raise ConfigError(f"{label}.{key}: no such file {path}")
            dest = _replace(dest, **{key: Path(path).absolute()})
    if (dest.tls_cert is None) != (dest.tls_key is None):
        raise ConfigError(f"{label}.tls_cert: tls_cert and tls_key go together")
    if dest.tls_cert is not None and dest.tls_ca is None:
        raise ConfigError(f"{label}.tls_ca: required with tls_cert (TLS needs the CA)")
    if dest.max_attempts < 1:
        raise ConfigError(f"{label}.max_attempts: must be >= 1")
    if dest.probe_max_seconds <= 0:
        raise ConfigError(f"{label}.probe_max_seconds: must be > 0")
    return dest


def _check_dicomweb(dest: DestinationConfig, label: str) -> DestinationConfig:
    """A STOW-RS destination: an http(s) base URL, auth from the environment, a bounded batch."""
    url = dest.base_url.rstrip("/")
    scheme, _, rest = url.partition("://")
    if scheme not in ("http", "https") or not rest or rest.startswith("/"):
        raise ConfigError(f"{label}.url: required for a dicomweb destination, http(s)://host/...")
    if "@" in rest.split("/", 1)[0]:
        raise ConfigError(f"{label}.url: no credentials in the URL (use auth and password_env)")
    if dest.auth not in ("none", "basic", "bearer"):
        raise ConfigError(f"{label}.auth: must be 'none', 'basic' or 'bearer', not {dest.auth!r}")
    if dest.auth == "basic":
        if not dest.username:
            raise ConfigError(f"{label}.username: required with auth = 'basic'")
        if not dest.password_env:
            raise ConfigError(
                f"{label}.password_env: required with auth = 'basic' (the name of an"
                " environment variable holding the password)"
            )
    if dest.auth == "bearer" and bool(dest.token_env) == (dest.token_file is not None):
        raise ConfigError(f"{label}.token_env: auth = 'bearer' needs token_env or token_file")
    for key in ("ca_file", "token_file"):
        path = getattr(dest, key)
        if path is not None:
            if not Path(path).is_file():
                raise ConfigError(f"{label}.{key}: no such file {path}")
            dest = _replace(dest, **{key: Path(path).absolute()})
    if dest.ca_file is not None and scheme != "https":
        raise ConfigError(f"{label}.ca_file: only for an https url")
    for key in ("tls_ca", "tls_cert", "tls_key"):
        if getattr(dest, key) is not None:
            raise ConfigError(f"{label}.{key}: not for a dicomweb destination (use ca_file)")
    if not 1 <= dest.instances_per_request <= 1000:
        raise ConfigError(f"{label}.instances_per_request: must be 1-1000")
    if dest.timeout_seconds <= 0:
        raise ConfigError(f"{label}.timeout_seconds: must be > 0")
    return _replace(dest, base_url=url)


def _section(cls: type, raw: Any, label: str) -> Any:
    """Build a dataclass from a TOML table, coercing to the annotated types; name bad keys."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{label}: expected a table")
    known = {f.name: f for f in fields(cls) if f.init}
    _reject_unknown(raw, set(known), label)
    values = {}
    for key, value in raw.items():
        values[key] = _coerce(value, known[key].type, f"{label}.{key}")
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"{label}: {exc}") from None


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    kind = str(annotation)
    try:
        if kind.startswith("tuple"):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{key}: expected a list of strings")
            return tuple(value)
        if kind == "bool":
            if not isinstance(value, bool):
                raise ConfigError(f"{key}: expected true or false")
            return value
        if kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{key}: expected an integer")
            return value
        if kind == "float":
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{key}: expected a number")
            return float(value)
        if "Path" in kind:
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{key}: expected a path")
            return Path(value)
        if kind == "SeriesPolicy":
            return SeriesPolicy(value)
        if kind == "DeidentifyRedactTextMode":
            return DeidentifyRedactTextMode(str(value).upper())
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string")
        return value
    except ValueError:
        choices = {
            "SeriesPolicy": [p.value for p in SeriesPolicy],
            "DeidentifyRedactTextMode": [m.value for m in DeidentifyRedactTextMode],
        }.get(kind, [])
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}") from None


def _reject_unknown(raw: Mapping[str, Any], known: set[str], label: str) -> None:
    unknown = sorted(set(raw) - known)
    if unknown:
        prefix = f"{label}." if label else ""
        raise ConfigError(f"unknown key {prefix}{unknown[0]} (known: {', '.join(sorted(known))})")


def _list(raw: Mapping[str, Any], key: str) -> list[Any]:
    value = raw.get(key, [])
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected an array of tables ([[{key}]])")
    return value


def _check_network_limits(node: NodeConfig) -> None:
    at_least = {
        "max_decoded_mb": 0,  # 0: no limit
        "max_pdu_kb": 4,
        "max_association_mb": 0,
        "max_association_seconds": 0,
        "max_associations": 1,
        "max_pending_connections": 1,
    }
    for key, low in at_least.items():
        if getattr(node, key) < low:
            raise ConfigError(f"node.{key}: must be >= {low}")
    if node.max_pdu_kb > 65536:
        raise ConfigError("node.max_pdu_kb: must be <= 65536 (64 MiB)")
    if node.association_request_timeout_seconds <= 0:
        raise ConfigError("node.association_request_timeout_seconds: must be > 0")


def _check_port(port: int, key: str) -> None:
    if not 0 < port < 65536:
        raise ConfigError(f"{key}: must be 1-65535")


def _replace(obj: Any, **changes: Any) -> Any:
    from dataclasses import replace

    return replace(obj, **changes)
