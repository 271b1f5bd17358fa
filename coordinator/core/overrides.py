"""Operator overrides: manual runs, and edits of status and schedule kept beside the catalogue.
"""

from __future__ import annotations

from dataclasses import replace

from coordinator.core import placement
from coordinator.core.actions import Action, RefusedError
from coordinator.core.base import EngineBase
from coordinator.core.run import Run, Trigger
from protocol.schedule import Schedule, ScheduleError, schedule_from_dict
from protocol.service import Kind, Service


class Overrides(EngineBase):
    def manual_run(self, service: str, now: float, request_id: str,
                   node: str | None = None) -> list[Action]:
        """Run `service` now, regardless of its schedule; on `node` only when given (it must
        be live and hold an allowed role). Raises RefusedError with a reason."""
        svc = self.services.get(service)
        if svc is None:
            raise RefusedError(f"unknown service {service!r}")
        if svc.is_daemon:
            raise RefusedError(f"{service!r} is a daemon: daemons cannot be run manually")
        if node is not None:
            live = self.nodes.get(node)
            if live is None:
                raise RefusedError(f"node {node!r} is not live")
            if not live.allows(svc.allowed_roles):
                raise RefusedError(f"node {node!r} holds no role {service!r} may run on "
                                   f"({', '.join(sorted(svc.allowed_roles))})")
        tg = placement.targets(svc, self.nodes.values())
        if tg is None:
            tg = [""]
        elif not tg:
            raise RefusedError(f"no live node holds an allowed role for {service!r}")
        elif node is not None:
            tg = [node]
        actions: list[Action] = []
        for target in tg:
            rid = f"manual-{request_id}" + (f"@{target}" if target else "")
            if self.knows(rid):
                continue  # the same request delivered or sent twice (a retry after failover)
            run = Run(
                run_id=rid,
                service=svc.name,
                trigger=Trigger.MANUAL,
                slot=None,
                queued_at=now,
                run_groups=svc.run_groups,
                node=target or node,
                target=target,
                epoch=self.epoch,
            )
            actions += self._admit(run, now)
        return actions

    def update_service(
        self,
        service: str,
        now: float,
        *,
        enabled: bool | None = None,
        schedule: Schedule | None = None,
    ) -> list[Action]:
        """Operator edit: status and schedule. Takes effect at the next slot."""
        base = self.base.get(service)
        if base is None:
            raise RefusedError(f"unknown service {service!r}")
        if schedule is not None and base.is_daemon:
            raise RefusedError(f"{service!r} is a daemon: it has no schedule to edit")
        if schedule is not None and schedule.kind != base.kind.value:
            # Switching between periodic/fixed/cron is allowed, as in the edit dialog.
            pass
        ov = dict(self.overrides.get(service, {}))
        if enabled is not None:
            ov["enabled"] = bool(enabled)
        if schedule is not None:
            ov["schedule"] = schedule.to_dict()
        svc = self._apply(base, ov)
        actions: list[Action] = []
        old = self.services[service]
        # A slot that came before the edit (not yet ticked) is handled as it was set up; one
        # set to fire at its instant that has not come yet follows the edit. (An order already
        # sent ahead of its slot stands: its worker starts it.)
        for slot in self._take_deferred(service):
            if slot <= now and old.enabled:
                actions += self._fire(old, slot, now)
        due = self.timeline.due_of(service)
        while old.schedule is not None and due is not None and due <= now:
            actions += self._fire(old, due, now)
            due = old.schedule.next_after(due, self.tz)
        self.overrides[service] = ov
        self._changes.overrides[service] = ov
        self.services[service] = svc
        if svc.is_daemon:
            return self._reconcile_daemons(now)
        if svc.enabled and svc.schedule is not None:
            # Slots are handled from now on under this schedule; a successor recovers from here,
            # not from slots of the old schedule or from the time the service was disabled.
            self._changes.cursors[service] = now
            self._set_next(svc, now)
        else:
            self.timeline.remove(service)
        return actions

    @staticmethod
    def _apply(base: Service, ov: dict[str, object]) -> Service:
        svc = base
        if "enabled" in ov:
            svc = replace(svc, enabled=bool(ov["enabled"]))
        if "schedule" in ov and not base.is_daemon:
            raw = ov["schedule"]
            sched = schedule_from_dict(raw) if isinstance(raw, dict) else None
            if sched is None:
                raise ScheduleError("a scheduled service cannot become a daemon")
            svc = replace(svc, schedule=sched, kind=Kind(sched.kind))
        return svc
