"""Check that a DVC remote can be reached before pushing to it or pulling from it.

`dvc pull` from a remote that is not there says only which files it could not find; this says which
remote, where it points and what to check, in one line, and exits 1:

    python -m tools.remote check               # the default remote
    python -m tools.remote check -r shared     # a named one
    python -m tools.remote check --for push    # a local remote need not exist yet: its parent must

`make pull` / `make push` run the check first, then `dvc pull` / `dvc push`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

HINTS = {
    "local": "check that the directory exists and is mounted (dvc remote modify --local {name} url <path>)",
    "s3": "check the endpoint, the bucket and the credentials (dvc remote modify --local {name} endpointurl / "
          "access_key_id / secret_access_key), and that the network reaches it",
}
DEFAULT_HINT = "check its url, credentials and that the network reaches it (dvc remote modify --local {name} ...)"


class RemoteError(Exception):
    pass


def remote_url(repo, name: str) -> str:
    try:
        return repo.config["remote"][name]["url"]
    except KeyError:
        known = ", ".join(sorted(repo.config["remote"])) or "none"
        raise RemoteError(f"remote '{name}' is not configured (configured: {known}; see dvc remote list)") from None


def check(root: str | Path = ".", name: str | None = None, purpose: str = "pull") -> str:
    """Return a one-line description of the reachable remote; raise RemoteError naming it otherwise."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        name = name or repo.config["core"].get("remote")
        if not name:
            raise RemoteError("no default remote: pass -r NAME, or set one with dvc remote default NAME")
        url = remote_url(repo, name)
        try:
            remote = repo.cloud.get_remote(name)
        except Exception as error:  # dvc raises for a missing plugin (dvc-s3, ...) or a malformed config
            raise RemoteError(f"remote '{name}' ({url}) cannot be used: {error}") from None
        protocol = remote.fs.protocol if isinstance(remote.fs.protocol, str) else remote.fs.protocol[0]
        hint = HINTS.get(protocol, DEFAULT_HINT).format(name=name)
        target = remote.path
        if protocol == "local" and purpose == "push":
            # dvc push creates the remote directory; only its parent must be there.
            target = remote.fs.parent(remote.path)
        try:
            reachable = remote.fs.exists(target)
        except Exception as error:  # connection refused, unknown host, bad credentials, ...
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise RemoteError(f"remote '{name}' ({url}) cannot be reached: {reason}; {hint}") from None
        if not reachable:
            what = "its parent directory" if target != remote.path else "it"
            raise RemoteError(f"remote '{name}' ({url}) cannot be reached: {what} does not exist ({target}); {hint}")
        return f"remote '{name}' ({url}) is reachable"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.remote", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check_parser = sub.add_parser("check", help="check that a remote can be reached")
    check_parser.add_argument("-r", "--remote", help="remote name (default: the repository's default remote)")
    check_parser.add_argument("--for", dest="purpose", choices=["pull", "push"], default="pull")
    check_parser.add_argument("--root", default=".", help="repository root")
    args = parser.parse_args(argv)
    try:
        print(check(args.root, args.remote, args.purpose))
    except RemoteError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
