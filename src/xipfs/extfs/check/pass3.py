"""Pass 3: connectivity, as e2fsck's pass3.c: every directory reachable from the root through
the parents pass 2 found, and every ``..`` naming that parent."""

from __future__ import annotations

from .. import layout as L
from . import problems as P
from .context import Context


def run(c: Context) -> None:
    """Follow each directory's parents to the root; report the unconnected, loops, wrong ``..``."""
    iused, itype, parent, dotdot = c.iused, c.itype, c.parent, c.dotdot
    root = L.ROOT_INO
    if not iused[root] or itype[root] != L.FT_DIR:
        c.report(P.NO_ROOT, root)
        return
    parent[root] = root
    dirs = [d.ino for d in c.dirs]
    # 0: not yet known, 1: connected to the root, 2: not connected (reported)
    state = bytearray(c.ninodes + 1)
    state[root] = 1
    for d in dirs:
        if state[d]:
            continue
        path = []
        on_path = set()
        cur = d
        while not state[cur]:
            path.append(cur)
            on_path.add(cur)
            p = parent[cur]
            if not p:
                c.report(P.UNCONNECTED_DIR, cur, dotdot=dotdot[cur])
                result = 2
                break
            if p in on_path:
                c.report(P.DIR_LOOP, cur)
                result = 2
                break
            cur = p
        else:
            result = state[cur]
        for x in path:
            state[x] = result
    for d in dirs:
        if dotdot[d] != parent[d]:
            c.report(P.DOTDOT_MISMATCH, d, dotdot=dotdot[d], parent=parent[d])
