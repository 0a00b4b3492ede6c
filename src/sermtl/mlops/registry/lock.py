"""The registry lock: mutual exclusion for alias changes of a registered model, through the MLflow API only
(a registered model of its own, whose unique name makes creating it atomic on any backend)."""

from __future__ import annotations

import contextlib
import random
import time
import uuid
from collections.abc import Mapping

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from sermtl.mlops import procinfo, tracking
from sermtl.mlops.registry.common import (
    BROKEN_LOCK_INFIX,
    LOCK_ACQUIRED_AT,
    LOCK_EXPIRES,
    LOCK_EXPIRES_AT,
    LOCK_HOST,
    LOCK_OWNER,
    LOCK_PID,
    LOCK_PREFIX,
    LOCK_PURPOSE,
    LOCK_SUFFIX,
    LOCK_TOKEN,
    LockTimeout,
    error_is,
    iso,
)

# Tokens of the locks this process holds: a lock recorded as held by this very process with a token not
# in here was left by an earlier holder in it whose release failed (e.g. the server was gone).
_HELD_TOKENS: set[str] = set()


def lock_name(name: str) -> str:
    return f"{name}{LOCK_SUFFIX}"


class PromotionLock:
    """Mutual exclusion for alias changes of registered model `name`, through the MLflow API only.

    - acquire: `create_registered_model("<name>.promotion-lock")` with tags owner, token (unique per
      acquisition), host, pid, acquired/expiry times. The store's unique name makes that succeed for
      exactly one caller; the others get RESOURCE_ALREADY_EXISTS and poll every `poll_s` (with jitter)
      until `timeout_s` has passed, then raise LockTimeout naming the holder.
    - expiry: a lock expires `expiry_s` (default `timeout_s`) after it was taken, by the holder's clock
      (clocks are assumed in sync to well under that). A lock whose holder provably no longer runs (it
      records host, pid, the pid's start time, boot id and pid namespace: sermtl.mlops.procinfo) is stale at
      once, so a SIGKILLed promotion on this machine costs no wait; one held from another machine or
      container waits for its expiry. A waiter that finds a stale lock (expired, or its holder gone)
      breaks it: it first creates the marker `<lock>.broken-<token>` (again a unique
      name, so exactly one waiter breaks a given stale lock, and a slow waiter can never delete a
      *newer* lock by mistake), then deletes the lock if its token is still the stale one, and competes
      for it again. The markers stay, tagged with who broke whose lock when: an audit trail.
    - release: deletes the lock if it still holds our token (a lock broken after our expiry is left to
      its new holder); best effort, it never raises. `held()` is checked before the critical write: a
      holder past its expiry refuses.
    """

    def __init__(
        self,
        mlflow_client: MlflowClient,
        name: str,
        *,
        owner: str,
        timeout_s: float,
        expiry_s: float | None = None,
        purpose: str = "promotion",
        poll_s: float = 0.2,
    ) -> None:
        self.client = mlflow_client
        self.name = name
        self.lock_name = lock_name(name)
        self.owner = owner
        self.timeout_s = float(timeout_s)
        self.expiry_s = float(expiry_s if expiry_s is not None else timeout_s)
        self.purpose = purpose
        self.poll_s = poll_s
        self.token = uuid.uuid4().hex
        self.expires_unix: float | None = None
        self.broken: list[str] = []  # tokens of stale locks this caller broke
        self.waited_s = 0.0

    def _try_create(self) -> bool:
        now = time.time()
        expires = now + self.expiry_s
        tags = {
            LOCK_OWNER: self.owner,
            LOCK_TOKEN: self.token,
            **procinfo.current().to_tags(LOCK_PREFIX),  # LOCK_HOST, LOCK_PID, start time, machine
            LOCK_PURPOSE: self.purpose,
            LOCK_ACQUIRED_AT: iso(now),
            LOCK_EXPIRES: f"{expires:.3f}",
            LOCK_EXPIRES_AT: iso(expires),
        }
        try:
            self.client.create_registered_model(
                self.lock_name,
                tags=tags,
                description=f"Lock on alias changes of {self.name} (sermtl.mlops.registry); "
                "deleted when released, breakable once expired.",
            )
        except MlflowException as exc:
            # DOES_NOT_EXIST: the store's own re-read after a name clash found the lock already released.
            if error_is(exc, "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                return False
            raise
        self.expires_unix = expires
        _HELD_TOKENS.add(self.token)
        return True

    def holder(self) -> dict[str, str] | None:
        """Tags of the current lock (plus `created_unix`), or None when nobody holds it."""
        try:
            model = self.client.get_registered_model(self.lock_name)
        except MlflowException as exc:
            if error_is(exc, "RESOURCE_DOES_NOT_EXIST"):
                return None
            raise
        tags = dict(model.tags or {})
        tags["created_unix"] = f"{(model.creation_timestamp or 0) / 1000:.3f}"
        return tags

    def _expiry_of(self, holder: Mapping[str, str]) -> float:
        try:
            return float(holder[LOCK_EXPIRES])
        except (KeyError, ValueError):  # not one of ours, or damaged: expire from its creation time
            return float(holder.get("created_unix", 0.0)) + self.expiry_s

    def _stale(self, holder: Mapping[str, str]) -> str | None:
        """Why the lock `holder` may be broken now, or None while it must be waited for."""
        if time.time() > self._expiry_of(holder):
            return f"expired at {holder.get(LOCK_EXPIRES_AT, '?')}"
        process = procinfo.ProcessId.from_tags(holder, LOCK_PREFIX)
        if process is None:
            return None
        if process == procinfo.current():
            if holder.get(LOCK_TOKEN) not in _HELD_TOKENS:
                return "left by this process, which no longer holds it"
            return None
        if procinfo.is_gone(process):
            return f"its holder ({process.describe()}) is gone"
        return None

    def _break(self, holder: Mapping[str, str], why: str = "expired") -> None:
        stale = holder.get(LOCK_TOKEN) or f"created-{holder.get('created_unix', '0').replace('.', '')}"
        try:
            self.client.create_registered_model(
                f"{self.lock_name}{BROKEN_LOCK_INFIX}{stale}",
                tags={
                    "sermtl.lock.broken_by": self.owner,
                    "sermtl.lock.broken_at": iso(time.time()),
                    "sermtl.lock.broken_because": why,
                    "sermtl.lock.stale_owner": holder.get(LOCK_OWNER, "?"),
                    "sermtl.lock.stale_host": holder.get(LOCK_HOST, "?"),
                    "sermtl.lock.stale_pid": holder.get(LOCK_PID, "?"),
                    "sermtl.lock.stale_acquired_at": holder.get(LOCK_ACQUIRED_AT, "?"),
                    "sermtl.lock.stale_expires_at": holder.get(LOCK_EXPIRES_AT, "?"),
                },
                description=f"Marker: the stale lock {stale} on {self.name} was broken here.",
            )
        except MlflowException as exc:
            if error_is(exc, "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                return  # another waiter is breaking (or broke) this very lock
            raise
        current = self.holder()
        current_token = (current or {}).get(LOCK_TOKEN) or (
            f"created-{(current or {}).get('created_unix', '0').replace('.', '')}" if current else None
        )
        if current is not None and current_token == stale:
            try:
                self.client.delete_registered_model(self.lock_name)
            except MlflowException as exc:
                if tracking.is_unreachable(exc):
                    raise
        self.broken.append(stale)

    def acquire(self) -> PromotionLock:
        started = time.monotonic()
        deadline = started + self.timeout_s
        while True:
            if self._try_create():
                break
            holder = self.holder()
            if holder is not None and holder.get(LOCK_TOKEN) == self.token:
                # our create reached the store but its answer was lost and the request retried
                self.expires_unix = self._expiry_of(holder)
                _HELD_TOKENS.add(self.token)
                break
            why = self._stale(holder) if holder is not None else None
            if why is not None:
                self._break(holder, why)
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.waited_s = time.monotonic() - started
                who = (
                    f"{holder.get(LOCK_OWNER, '?')} (pid {holder.get(LOCK_PID, '?')} on "
                    f"{holder.get(LOCK_HOST, '?')}, {holder.get(LOCK_PURPOSE, '?')}) since "
                    f"{holder.get(LOCK_ACQUIRED_AT, '?')}, expiring {holder.get(LOCK_EXPIRES_AT, '?')}"
                    if holder
                    else "someone who keeps re-taking it"
                )
                raise LockTimeout(
                    f"registry lock {self.lock_name!r} held by {who}; gave up after {self.timeout_s:g} s"
                )
            if holder is not None:
                time.sleep(min(remaining, self.poll_s * (0.5 + random.random())))
        self.waited_s = time.monotonic() - started
        return self

    def held(self) -> bool:
        """Still ours: our token on the lock and not past our expiry."""
        if self.expires_unix is None or time.time() >= self.expires_unix:
            return False
        holder = self.holder()
        return holder is not None and holder.get(LOCK_TOKEN) == self.token

    def release(self, *, quick: bool = False) -> None:
        """Delete the lock if it is still ours. Never raises: a lock that cannot be deleted (the server
        is gone) is broken by the next holder, at once if this process has ended by then, else after its
        expiry. `quick`: one attempt per call, for a release after a failure."""
        if self.expires_unix is None:
            return
        self.expires_unix = None
        _HELD_TOKENS.discard(self.token)
        with contextlib.ExitStack() as stack:
            if quick:
                stack.enter_context(tracking.quick_requests())
            with contextlib.suppress(Exception):
                holder = self.holder()
                if holder is not None and holder.get(LOCK_TOKEN) == self.token:
                    self.client.delete_registered_model(self.lock_name)

    def __enter__(self) -> PromotionLock:
        return self.acquire()

    def __exit__(self, kind: object, *exc: object) -> None:
        self.release(quick=kind is not None)
