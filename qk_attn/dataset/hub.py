"""Push a capture folder to a Hub dataset repo (or branch), pull one back to resume into it.

OUT mirrors one repo branch (the commit protocol: docs/architecture.md). `push` creates the
repo and branch when missing, uploads the committed shards (deleting remote shards the local
manifest no longer lists, e.g. after compaction), then the manifest and card — so a reader
never sees a manifest listing shards that are not there yet. It refuses to push over remote
examples the local folder lacks (pull first). Any Hub failure is a `HubError` carrying the
Hub's message; a repo id that cannot name a Hub repo (a local path) is a `ConfigError`, a usage
error, before anything is contacted.

Both take `progress` (default True): `push` shows a tqdm bar on stderr over the shards it checks
and huggingface_hub's bars over the upload, `pull` the download's; False (`--quiet`) shows none,
and neither shows where huggingface_hub's bars are switched off (`disable_progress_bars()`,
HF_HUB_DISABLE_PROGRESS_BARS=1).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from huggingface_hub import HfApi

from qk_attn.dataset.progress import bar, hub_bars, hub_enabled
from qk_attn.errors import ConfigError, HubError, StorageError, one_line
from qk_attn.storage.card import write_card
from qk_attn.storage.layout import CARD, CHART, EXAMPLES, MANIFEST
from qk_attn.storage.lock import release_lock, take_lock
from qk_attn.storage.manifest import read_manifest, write_json_atomic
from qk_attn.storage.settings import check_same_capture, is_repo_id, public_manifest

SHARDS = "l*h*/*.parquet"
REPO_TYPE = "dataset"


def _where(repo_id: str, revision: str | None) -> str:
    return repo_id + (f"@{revision}" if revision else "")


def check_repo_id(repo_id: str) -> None:
    """A usage error (exit 2), not a failed transfer: `repo_id` cannot name a Hub repo."""
    if not isinstance(repo_id, str) or not is_repo_id(repo_id):
        raise ConfigError(
            f"repo {repo_id!r} is not a Hub dataset repo id: expected NAME or ORG/NAME (e.g. org/sniffed-qk); "
            "a local copy is made with cp or rsync, not push or pull"
        )


def _remote_manifest(api: HfApi, repo_id: str, revision: str | None) -> dict | None:
    """The remote qk_sniff.json, or None when the repo or branch (or the file) does not exist."""
    if not api.repo_exists(repo_id, repo_type=REPO_TYPE):
        return None
    if revision and not api.revision_exists(repo_id, revision, repo_type=REPO_TYPE):
        return None
    root = api.snapshot_download(repo_id, repo_type=REPO_TYPE, revision=revision, allow_patterns=[MANIFEST])
    return read_manifest(root)


def push(
    output: str | os.PathLike,
    repo_id: str,
    revision: str | None = None,
    private: bool = False,
    token: str | bool | None = None,
    api: HfApi | None = None,
    progress: bool = True,
) -> str:
    """Upload OUT to the dataset repo `repo_id` (branch `revision`, created when missing); returns its URL.
    `progress`: bars on stderr (the shards checked, then huggingface_hub's upload bars)."""
    check_repo_id(repo_id)
    progress = hub_enabled(progress)
    output = Path(output)
    manifest = read_manifest(output)
    if manifest is None:
        raise FileNotFoundError(f"{output} is not a qk-sniff capture: {MANIFEST} is missing")
    lock = take_lock(output)  # a capture still writing here would push a moving target
    api = api or HfApi(token=token)
    where = _where(repo_id, revision)
    try:
        with hub_bars(progress):
            _check_shards(output, manifest, progress)
            remote = _remote_manifest(api, repo_id, revision)
            if remote is not None:
                lacking = set(remote.get("examples", {})) - set(manifest.get("examples", {}))
                if lacking:
                    raise HubError(
                        f"{where} holds {len(lacking)} committed example(s) that {output} lacks; pushing would delete them. "
                        f"Pull first (qk-sniff pull {output} --repo {repo_id}"
                        f"{' --revision ' + revision if revision else ''}), or push to another branch."
                    )
            api.create_repo(repo_id, repo_type=REPO_TYPE, private=private or None, exist_ok=True)
            if revision:
                api.create_branch(repo_id, branch=revision, repo_type=REPO_TYPE, exist_ok=True)
            write_card(output, manifest, repo_id=repo_id, revision=revision)  # loading snippet names the repo
            common = dict(repo_id=repo_id, repo_type=REPO_TYPE, revision=revision)
            api.upload_folder(
                **common,
                folder_path=output,
                allow_patterns=[SHARDS],
                ignore_patterns=_unlisted_shards(output, manifest),  # a killed run's orphans, copies: never published
                delete_patterns=[SHARDS],
                commit_message=f"qk-sniff: {len(manifest['examples'])} examples (shards)",
            )
            with tempfile.TemporaryDirectory(prefix="qk-sniff-push-") as staging:  # the manifest without local paths
                staging = Path(staging)
                write_json_atomic(staging / MANIFEST, public_manifest(manifest), fsync=False)
                for name in (EXAMPLES, CARD, CHART):
                    if (output / name).is_file():
                        shutil.copy(output / name, staging / name)
                api.upload_folder(
                    **common,
                    folder_path=staging,
                    allow_patterns=[MANIFEST, EXAMPLES, CARD, CHART],
                    commit_message=f"qk-sniff: {len(manifest['examples'])} examples (manifest, card)",
                )
    except (HubError, StorageError):
        raise
    except Exception as error:  # noqa: BLE001 - any Hub/network failure: keep the Hub's own words
        raise HubError(f"pushing {output} to {where} failed: {error}") from error
    finally:
        release_lock(output, lock)
    return f"https://huggingface.co/datasets/{repo_id}" + (f"/tree/{revision}" if revision else "")


def pull(
    repo_id: str,
    output: str | os.PathLike,
    revision: str | None = None,
    token: str | bool | None = None,
    api: HfApi | None = None,
    missing_ok: bool = False,
    progress: bool = True,
) -> Path | None:
    """Download a remote capture into OUT so a run resumes into it.

    Returns OUT, or None when the repo/branch does not exist and `missing_ok`. Refuses when OUT
    already holds committed examples the remote lacks (they would be orphaned), or a
    capture with different settings. `progress`: huggingface_hub's download bars on stderr.
    """
    check_repo_id(repo_id)
    progress = hub_enabled(progress)
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise StorageError(f"{output} is a file; pull writes the capture into a folder: name a new or capture folder")
    created = not output.exists()
    output.mkdir(parents=True, exist_ok=True)
    lock = take_lock(output)
    api = api or HfApi(token=token)
    where = _where(repo_id, revision)
    try:
        with hub_bars(progress):
            remote = _remote_manifest(api, repo_id, revision)
            if remote is None:
                if missing_ok:
                    return None
                raise HubError(f"{where} does not exist or holds no {MANIFEST}: nothing to pull")
            local = read_manifest(output)
            if local is not None:
                lacking = set(local.get("examples", {})) - set(remote.get("examples", {}))
                if lacking:
                    raise HubError(
                        f"{output} holds {len(lacking)} committed example(s) that {where} lacks; pulling would discard "
                        f"them. Push first (qk-sniff push {output} --repo {repo_id}), or pull into another folder."
                    )
                from qk_attn.config import SniffConfig

                try:
                    config = SniffConfig(**{k: v for k, v in local["config"].items() if k in SniffConfig.field_names()})
                    check_same_capture(output, remote, config, local.get("source"))
                except ValueError as error:
                    raise HubError(f"{where} and {output} are different captures: {error}") from error
            api.snapshot_download(
                repo_id,
                repo_type=REPO_TYPE,
                revision=revision,
                local_dir=output,
                allow_patterns=[MANIFEST, EXAMPLES, CARD, CHART, SHARDS],
            )
    except HubError:
        raise
    except Exception as error:  # noqa: BLE001
        raise HubError(f"pulling {where} into {output} failed: {error}") from error
    finally:
        release_lock(output, lock)
        if created and not any(output.iterdir()):  # a failed pull leaves nothing behind
            output.rmdir()
    return output


def _unlisted_shards(output: Path, manifest: dict) -> list[str]:
    """Files SHARDS matches that the manifest does not list (a glob reader on the Hub would read them)."""
    import fnmatch

    listed = {f"{key}/{name}" for key, names in manifest["shards"].items() for name in names}
    found = (path.relative_to(output).as_posix() for path in output.glob("l*h*/**/*") if path.is_file())
    return sorted(path for path in found if fnmatch.fnmatch(path, SHARDS) and path not in listed)


def _check_shards(output: Path, manifest: dict, progress: bool = False) -> None:
    """Every committed shard against its recorded size and sha256: a damaged shard is never published."""
    from qk_attn.dataset.reader import check_shard

    shards = sum(len(names) for names in manifest["shards"].values())
    with bar("qk-sniff push: shards", "shard", progress, shards) as shard_bar:
        for key, names in sorted(manifest["shards"].items()):
            for name in names:
                problem = check_shard(output, manifest, key, name, read=False)
                if problem:
                    raise StorageError(
                        f"{output / key / name}: {problem}; nothing was pushed: run `qk-sniff verify "
                        f"{output}`, then `qk-sniff repair {output}` and the capture again"
                    )
                shard_bar.update(1)


def snapshot(
    repo_id: str,
    revision: str | None = None,
    allow_patterns: list[str] | None = None,
    token: str | bool | None = None,
    api: HfApi | None = None,
) -> Path:
    """Files of a dataset repo in the local Hugging Face cache (for `qk_attn.dataset.load`)."""
    api = api or HfApi(token=token)
    try:
        return Path(
            api.snapshot_download(repo_id, repo_type=REPO_TYPE, revision=revision, allow_patterns=allow_patterns)
        )
    except Exception as error:  # noqa: BLE001
        raise HubError(f"downloading {_where(repo_id, revision)} failed: {one_line(error)}") from error
