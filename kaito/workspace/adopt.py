"""Create an object, or adopt the one that already has its name -- if it is ours.

Every object the controller creates has a deterministic name (children: the workspace's; node
requests: a hash of the workspace and the slot), so a create can answer AlreadyExists because the
informer cache is behind the controller's own earlier create, a restart or another replica made it
first -- or because someone else's object holds the name. :func:`create_or_adopt` is the one place
that tells these apart: it reads the object back live and adopts it when ``ours`` says so, raises
:class:`ChildConflict` when it is not ours (never take over a stranger's object), and reports an object
that vanished between the two calls as ``obj=None`` (the caller's next reconcile creates it again).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kaito.runtime.kube import ApiError, KubeClient, Obj, Resource


class ChildConflict(Exception):
    """A name the workspace needs is taken by an object the workspace does not own."""


@dataclass(frozen=True)
class Adoption:
    """The object after :func:`create_or_adopt`."""

    obj: Obj | None
    """What the create returned, the existing object adopted, or None when it vanished meanwhile."""
    created: bool
    """True when this call created it."""


async def create_or_adopt(
    client: KubeClient,
    res: Resource,
    body: Obj,
    namespace: str | None = None,
    *,
    ours: Callable[[Obj], bool],
    conflict: str,
) -> Adoption:
    """Create ``body``; on AlreadyExists read the existing object and adopt it if ``ours(existing)``,
    else raise :class:`ChildConflict` with the message ``conflict``."""
    try:
        return Adoption(await client.create(res, body, namespace), created=True)
    except ApiError as e:
        if not e.already_exists:
            raise
    existing = await client.get_or_none(res, str(body["metadata"]["name"]), namespace)
    if existing is not None and not ours(existing):
        raise ChildConflict(conflict)
    return Adoption(existing, created=False)


def owned_by(uid: str | None) -> Callable[[Obj], bool]:
    """``ours`` for namespaced children: an ownerReference names the workspace's uid."""

    def check(obj: Obj) -> bool:
        refs = (obj.get("metadata") or {}).get("ownerReferences") or []
        return any(r.get("uid") == uid for r in refs)

    return check


def anyone(_: Obj) -> bool:
    """``ours`` for an object shared by several workspaces (adopted whoever created it)."""
    return True
