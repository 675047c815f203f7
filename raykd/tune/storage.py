"""Where a study folder lives: a local or shared path, or a cloud URI (``--storage``).

* **A path** (default ``runs/``): the study folder is ``<path>/<name>/`` and every process writes
  into it directly, so on a multi-node cluster it must be a filesystem mounted at the same path on
  every node (NFS, EFS, Filestore, Lustre).  :func:`check_shared` asks every alive node to find a
  marker file the driver wrote, and refuses a path some node cannot see.
* **A URI** (``s3://``, ``gs://``, ``abfs://``, ``hdfs://``, ``file://``; pyarrow's filesystems, the
  ones Ray's ``storage_path`` uses): Ray writes the Tune experiment and all checkpoints straight to
  ``<uri>/<name>/``; the driver keeps the raykd files (``study.yaml``, ``optuna.db``, the trial run
  folders rebuilt from the results Tune hands it, ``best.yaml``, the report) in a working copy
  ``runs/<name>/`` on the machine that runs ``raykd study run`` and copies it to ``<uri>/<name>/``
  after every finished trial and at the end.  Limits: studies only (ablations need a path), and no
  ``teacher.run`` (a teacher trained on the head is not visible to trials on other nodes; train it
  first and give ``teacher.checkpoint`` on a path every node sees).

This module imports only the standard library at import time: its node check runs as a tiny Ray task
on every node.
"""

from __future__ import annotations

import os
import urllib.parse
import uuid
from pathlib import Path

from raykd.errors import ConfigError

#: URI schemes pyarrow opens without extra packages (the filesystems Ray's ``storage_path`` accepts)
URI_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs", "viewfs", "file")


def is_uri(value: str | None) -> bool:
    """True for ``scheme://...`` (a one-letter scheme is a Windows drive, not a URI)."""
    return bool(value) and "://" in value and len(urllib.parse.urlparse(value).scheme) > 1


def check_storage(value: str | None, field: str = "tune.storage", uri_ok: bool = True) -> str | None:
    """Syntax check of a storage value (no filesystem or network access); returns it unchanged.

    Raises ConfigError for an empty value, a URI with a scheme pyarrow cannot open, a URI without a
    bucket/host or path, or a URI where ``uri_ok`` is False.
    """
    if value is None:
        return None
    if not value.strip():
        raise ConfigError(field, "empty; give a folder (shared by all nodes on a cluster) or a cloud URI")
    if "://" not in value:
        return value
    scheme = urllib.parse.urlparse(value).scheme.lower()
    if not uri_ok:
        raise ConfigError(field, f"{value!r} is a URI; this needs a folder (on a cluster, one mounted at the same "
                          "path on every node); cloud URIs are supported for studies only")  # fmt: skip
    if scheme not in URI_SCHEMES:
        raise ConfigError(field, f"unsupported URI scheme {scheme + '://'!r}; use a folder or one of "
                          f"{', '.join(s + '://' for s in URI_SCHEMES)}")  # fmt: skip
    rest = value.split("://", 1)[1].strip("/")
    if not rest:
        raise ConfigError(field, f"{value!r} names no bucket or folder, e.g. s3://my-bucket/raykd")
    return value


def join(uri: str, *parts: str) -> str:
    """``uri`` with path parts appended (query strings are not supported)."""
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def open_uri(uri: str, field: str = "--storage"):
    """``(pyarrow filesystem, path)`` of ``uri``; a failure (unknown bucket, no credentials, missing
    package) becomes a ConfigError naming ``field``."""
    import pyarrow.fs

    try:
        return pyarrow.fs.FileSystem.from_uri(uri)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types; the user needs one line
        msg = str(e).strip().splitlines()
        raise ConfigError(field, f"cannot open {uri}: {msg[0] if msg else type(e).__name__}") from None


def uri_exists(uri: str) -> bool:
    import pyarrow.fs

    fs, path = open_uri(uri)
    try:
        return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound
    except Exception as e:  # noqa: BLE001 - no such bucket, no permission: one line for the user
        msg = str(e).strip().splitlines()
        raise ConfigError("--storage", f"cannot read {uri}: {msg[0] if msg else type(e).__name__}") from None


def upload(local_dir: Path, uri: str) -> None:
    """Copy the contents of ``local_dir`` to ``uri`` (overwriting files of the same name)."""
    import pyarrow.fs

    fs, path = open_uri(uri)
    fs.create_dir(path, recursive=True)
    pyarrow.fs.copy_files(str(Path(local_dir).resolve()), path, destination_filesystem=fs)


def node_local_root(study_name: str) -> Path:
    """Scratch folder for trial run folders on the node a trial runs on (URI storage)."""
    import tempfile

    return Path(tempfile.gettempdir()) / "raykd" / study_name


# --------------------------------------------------------------------------------------------
# is a path shared by every node?


def _sees(path: str) -> tuple[bool, str]:
    import socket

    return os.path.exists(path), socket.gethostname()


def check_shared(folder: Path, field: str = "--storage", timeout_s: float = 120.0) -> int:
    """On a multi-node Ray cluster, make sure every alive node sees ``folder`` (a marker file the driver
    writes there); returns the number of nodes checked.  One zero-CPU task per node.

    Raises ConfigError naming ``field`` when a node cannot see the marker: the folder is on a disk of
    this machine only, and trials elsewhere would write their results where nobody reads them.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return len(nodes)
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder.resolve() / f".raykd-shared-{uuid.uuid4().hex[:8]}"
    marker.write_text("written by the raykd driver to check that every node sees this folder\n")
    task = ray.remote(num_cpus=0, max_retries=0)(_sees)
    try:
        refs = {n["NodeManagerAddress"] + " (" + n["NodeID"][:8] + ")":
                task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
                    str(marker)) for n in nodes}  # fmt: skip
        try:
            seen = dict(zip(refs, ray.get(list(refs.values()), timeout=timeout_s), strict=True))
        except ray.exceptions.GetTimeoutError:
            print(f"warning: could not check within {timeout_s:.0f} s that every node sees {folder}", flush=True)
            return len(nodes)
    finally:
        marker.unlink(missing_ok=True)
    missing = [f"{node} [{host}]" for node, (ok, host) in seen.items() if not ok]
    if missing:
        raise ConfigError(field, f"{folder.resolve()} is not shared: node(s) {', '.join(missing)} cannot see it; "
                          "use a folder mounted at the same path on every node (NFS/EFS/Filestore) or a cloud URI "
                          "(docs/cluster.md)")  # fmt: skip
    return len(nodes)
