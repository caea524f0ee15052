#!/usr/bin/python3
"""incremental_backup.py URL IMAGE BACKUP [--token TOKEN]: keep BACKUP, a raw file,
equal to a point in time of a qcowd image, copying all of it the first time and
only what changed since the last run afterwards.

Each run:
  1. adds a dirty bitmap, backup-N: from now on every write to the image marks it;
  2. takes an internal snapshot, backup-N: the point in time this run copies
     (writes go on meanwhile, into the image, not into the snapshot);
  3. the first time copies the whole snapshot; later copies the runs that the
     previous run's bitmap marks dirty (everything written since before the
     previous snapshot: a superset of what changed, never less), from the new
     snapshot into BACKUP;
  4. then removes the previous bitmap and snapshot, and records N in BACKUP.state.
A run cut short leaves the previous backup-N in place: the next run starts from
it again. Standard library + qcowd_client only.
"""
import argparse
import json
import os

import qcowd_client


def load_state(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def backup(client, image, dest):
    state_path = dest + ".state"
    state = load_state(state_path)
    n = state["n"] + 1 if state else 1
    name = "backup-%d" % n
    client.add_bitmap(image, name)              # marks every write from here on
    client.create_snapshot(image, name, wait=True)   # the point in time of this backup
    size = client.size(image)
    copied = 0
    if state is None or not os.path.exists(dest):
        with open(dest, "wb") as f:
            copied = client.read_snapshot(image, name, into=f)
    else:
        with open(dest, "r+b") as f:
            f.truncate(size)
            for run in client.dirty_extents(image, state["bitmap"]):
                if run["dirty"]:
                    f.seek(run["start"])
                    copied += client.read_snapshot(image, name, run["start"], run["length"], into=f)
            f.flush()
            os.fsync(f.fileno())
    old = state
    with open(state_path + ".new", "w") as f:
        json.dump({"n": n, "bitmap": name, "snapshot": name}, f)
    os.replace(state_path + ".new", state_path)
    if old:
        client.remove_bitmap(image, old["bitmap"])
        client.delete_snapshot(image, old["snapshot"], wait=True)
    return n, copied, size


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("url")
    ap.add_argument("image")
    ap.add_argument("backup")
    ap.add_argument("--token", default=os.environ.get("QCOWD_TOKEN"))
    a = ap.parse_args()
    client = qcowd_client.Client(a.url, token=a.token)
    n, copied, size = backup(client, a.image, a.backup)
    print("backup %d of %s: %d of %d bytes copied" % (n, a.image, copied, size))


if __name__ == "__main__":
    main()
