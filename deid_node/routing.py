"""Routing: which projects take an association, and which take each instance it delivers.

An association is accepted when at least one project accepts its called and calling AE titles
(the node-wide checks of [node] come first). Each received instance goes to every project that
accepts its association and whose `match` holds on its header (fan-out); none: unrouted (kept,
reported, never forwarded). A C-GET the node itself requested for a pull job feeds that job's
project only (its match still applies).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pydicom import Dataset

from deid_node.conditions import SaveDeidentifiedDicomCondition
from deid_node.config import Config, ProjectConfig


@dataclass(frozen=True)
class Router:
    projects: tuple[ProjectConfig, ...]

    @classmethod
    def from_config(cls, config: Config) -> Router:
        return cls(config.all_projects)

    def called_ae_titles(self) -> set[str]:
        return {title for p in self.projects for title in p.called_ae_titles}

    def knows_called(self, called_ae: str) -> bool:
        return called_ae.strip() in self.called_ae_titles()

    def accepts(self, called_ae: str, calling_ae: str) -> bool:
        return any(p.accepts_association(called_ae, calling_ae) for p in self.projects)

    def match_tags(self) -> list[int]:
        """The tags the match rules read (the SCP reads them with the header it checks)."""
        return sorted({int(c.tag) for p in self.projects for c in p.match})

    def route(
        self,
        header: Dataset,
        *,
        called_ae: str = "",
        calling_ae: str = "",
        only: Sequence[str] | None = None,
    ) -> list[str]:
        """The names of the projects that take this instance. `only`: the projects a pull
        job's own association feeds (C-GET), instead of the AE titles'."""
        chosen = []
        for project in self.projects:
            if only is not None:
                if project.name not in only:
                    continue
            elif not project.accepts_association(called_ae, calling_ae):
                continue
            if matches(project.match, header):
                chosen.append(project.name)
        return chosen


def matches(conditions: Iterable[SaveDeidentifiedDicomCondition], header: Dataset) -> bool:
    """Every condition holds (none: every instance). A condition that cannot be evaluated on
    a malformed value does not hold."""
    try:
        return all(condition.evaluate(header).evaluated_value for condition in conditions)
    except Exception:  # noqa: BLE001 - a malformed value routes nowhere, it never fails the ack
        return False
