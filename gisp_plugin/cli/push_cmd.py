"""``gisp push DIR REPO_ID``: upload a pruned folder (weights, modelling code, record, model card) to the Hub.

Offline (``HF_HUB_OFFLINE=1``) it stops with a clear error before any request is made. The token comes from
``hf auth login`` or ``HF_TOKEN``, as everywhere in huggingface_hub.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from gisp_plugin.checkpoint.saving import read_record
from gisp_plugin.data.hub import hub_offline
from gisp_plugin.deploy.model_card import CARD_FILE, write_model_card
from gisp_plugin.models.loading import load_model

log = logging.getLogger(__name__)


class PushError(OSError):
    """A folder that cannot be pushed, or a Hub that cannot be reached."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("push", help="upload a pruned folder (with its model card) to the Hugging Face Hub")
    parser.add_argument("folder", type=Path, help="a folder written by gisp prune or gisp compare --save-models")
    parser.add_argument("repo_id", help="owner/name of the model repository (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--message", default=None, help="commit message")
    parser.set_defaults(run=run)


def check_loads(folder: Path) -> None:
    """The folder loads as it will from the Hub: its config, every weight (matching the config), the
    modelling file its ``auto_map`` names and its tokenizer; otherwise one line naming the missing piece."""
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    for entry in (config.get("auto_map") or {}).values():
        module = str(entry).rpartition(".")[0]
        if module and not (folder / f"{module}.py").is_file():
            raise PushError(
                f"{str(folder)!r} has no {module}.py, the modelling file its config.json names, so nothing was sent; "
                "save the folder again with gisp prune"
            )
    load_model(str(folder))  # config, weights and tokenizer: each missing or damaged piece is named


def run(args: argparse.Namespace) -> int:
    record = read_record(args.folder)  # refuses folders that are not pruned models
    if len(args.repo_id.split("/")) != 2 or not all(args.repo_id.split("/")):
        raise PushError(f"repository id {args.repo_id!r} must be owner/name")
    check_loads(args.folder)
    if hub_offline():
        raise PushError(
            f"the Hugging Face Hub is offline here (HF_HUB_OFFLINE is set), so nothing was sent; "
            f"unset it and run `gisp push {args.folder} {args.repo_id}` where the Hub is reachable"
        )
    if not (args.folder / CARD_FILE).exists():  # folders saved before model cards existed
        write_model_card(args.folder, record)
    from huggingface_hub import HfApi

    api = HfApi()
    message = args.message or f"gisp-plugin: {record['method']} at {record['sparsity']:.1%} sparsity"
    try:
        api.create_repo(args.repo_id, private=args.private, exist_ok=True)
        info = api.upload_folder(repo_id=args.repo_id, folder_path=args.folder, commit_message=message)
    except Exception as err:  # no network, no token, no rights: huggingface_hub raises many types for these
        raise PushError(f"could not upload {str(args.folder)!r} to {args.repo_id!r}: {err}") from err
    print(info.commit_url if hasattr(info, "commit_url") else info)
    return 0
