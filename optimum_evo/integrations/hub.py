"""``save_pretrained`` and ``push_to_hub`` of EvoPress-compressed models.

A model compressed (or reloaded) through `EvoPressConfig`
gets instance versions of ``save_pretrained`` and ``push_to_hub``:

* ``save_pretrained(dir)`` writes the EvoPress checkpoint (`optimum_evo.checkpoint.save_checkpoint`:
  ``config.json`` with the EvoPress ``quantization_config``, ``model.safetensors`` with the packed
  tensors, ``generation_config.json``, a ``README.md`` model card and an attached LoRA correction
  adapter in ``lora-correction/``).
* ``push_to_hub(repo_id)`` creates the repository, writes that checkpoint into a temporary folder
  (the card and the adapter then name the repository) and uploads exactly those files in one
  commit (transformers' own ``push_to_hub`` would replace the card by a generic one fetched from
  the Hub).

Nothing pushed holds a local path: the record uploaded in ``config.json`` is
`optimum_evo.card.public_record` (the base model's folder and local text files become names),
and `upload_folder` (also what ``optimum-evo search/export --push-to-hub`` use) rewrites a
folder's own path into the repository id in the card and the adapter config.

The same functions work on any EvoPress model: `save_pretrained`, `push_to_hub`;
`model_card` returns the card's text.

Examples:
    >>> model.save_pretrained("compressed")                                # doctest: +SKIP
    >>> print(open("compressed/README.md").read()[:200])                   # doctest: +SKIP
    >>> model.push_to_hub("me/smollm2-evopress-3bit", private=True)        # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import types
from pathlib import Path

from ..card import model_card as _card_text, public_record, write_card
from ..checkpoint import CARD_NAME, check_evopress_model, has_adapter, save_checkpoint
from ..record import QUANT_METHOD, read_record

logger = logging.getLogger(__name__)

__all__ = ["attach_hub_methods", "hub_files", "model_card", "push_to_hub", "read_card_metadata", "save_pretrained",
           "upload_folder"]


def _record(model) -> dict:
    check_evopress_model(model)  # never save (or push) a randomly initialised "EvoPress" model
    record = read_record(model)
    if record is None:
        raise ValueError("This model has no EvoPress quantization_config (it was not compressed with EvoPressConfig).")
    return record


def model_card(model, repo_id: str | None = None, tags=None) -> str:
    """The README.md text (YAML metadata + markdown) describing an EvoPress model; ``repo_id`` (a Hub
    id or folder) is the name used in the loading snippet."""
    record = read_record(model)
    if record is None:
        raise ValueError("This model has no EvoPress quantization_config (it was not compressed with EvoPressConfig).")
    return _card_text(record, repo_id, tags=tags, adapter=has_adapter(model))


def _picture_source(model, record: dict):
    """The ``profile.png`` of the EvoPress checkpoint ``model`` was loaded from (a folder whose
    record has the same profile), if any."""
    folder = getattr(model, "name_or_path", None)
    if not folder or not Path(folder, "profile.png").is_file() or not Path(folder, "config.json").is_file():
        return None
    try:
        saved = json.loads(Path(folder, "config.json").read_text(encoding="utf-8")).get("quantization_config") or {}
    except (OSError, ValueError):
        return None
    return Path(folder, "profile.png") if saved.get("profile") == record.get("profile") else None


def save_pretrained(model, save_directory, **kwargs):
    """Write the EvoPress checkpoint of ``model`` (`optimum_evo.checkpoint.save_checkpoint`) with
    its model card (and the per-layer profile picture of the folder it was loaded from, if any:
    `optimum_evo.card.write_card`).
    ``push_to_hub=True`` uploads the folder afterwards (``repo_id``, ``commit_message``,
    ``create_pr``, ``private``, ``token`` as in transformers)."""
    record = _record(model)
    push = kwargs.pop("push_to_hub", False)
    hub = {k: kwargs.pop(k) for k in ("repo_id", "commit_message", "create_pr", "private") if k in kwargs}
    token = kwargs.get("token")
    repo_id = hub.get("repo_id") if push else None
    folder = save_checkpoint(model, save_directory, record, repo_id=repo_id, **kwargs)
    picture = _picture_source(model, record)
    if picture is not None and kwargs.get("is_main_process", True):  # the card shows the search's picture
        write_card(folder, record, repo_id or str(Path(save_directory)), adapter=has_adapter(model),
                   picture_from=picture)
    if push:
        repo_id = hub.get("repo_id", Path(save_directory).name)
        return upload_folder(save_directory, repo_id, token=token, private=hub.get("private"),
                       commit_message=hub.get("commit_message"), create_pr=hub.get("create_pr", False))
    return None


TEXT_SUFFIXES = (".json", ".md", ".txt", ".jinja", ".yaml", ".yml")


def hub_files(folder, repo_id: str) -> dict:
    """``{path in the repository: local path or bytes}``: the files of ``folder`` as they are
    uploaded to ``repo_id``. An EvoPress record in ``config.json`` is replaced by its
    `optimum_evo.card.public_record`; in the text files (card, adapter config, ...) the folder's
    own path becomes ``repo_id``. Other files are uploaded unchanged."""
    folder = Path(folder)
    local_names = sorted({str(folder), str(folder.resolve()), os.path.abspath(folder)}, key=len, reverse=True)
    files = {}
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(folder).as_posix()
        data = None
        if p.suffix in TEXT_SUFFIXES:
            try:
                text = p.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                text = None
            if text is not None:
                new = text
                for local in local_names:
                    new = new.replace(local, repo_id)
                if rel.endswith("config.json") and "quantization_config" in new:
                    new = _public_config(new)
                if new != text:
                    data = new.encode("utf-8")
        files[rel] = data if data is not None else str(p)
    return files


def _public_config(text: str) -> str:
    config = json.loads(text)
    qc = config.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        return text
    public = public_record(qc)
    if public == qc:
        return text
    config["quantization_config"] = public
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def upload_folder(folder, repo_id, token=None, private=None, commit_message=None, commit_description=None,
                  create_pr=False, revision=None):
    """Create the repository ``repo_id`` if needed and upload every file of ``folder`` to it in one
    commit (public ``huggingface_hub`` APIs: ``HfApi.create_repo`` and ``HfApi.create_commit``),
    without local paths (`hub_files`)."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=src)
                  for rel, src in hub_files(folder, repo_id).items()]
    return api.create_commit(repo_id=repo_id, operations=operations,
                             commit_message=commit_message or "Upload EvoPress-compressed model (optimum-evo)",
                             commit_description=commit_description, token=token, create_pr=create_pr,
                             revision=revision)


def push_to_hub(model, repo_id: str, *, commit_message: str | None = None, commit_description: str | None = None,
                private: bool | None = None, token=None, revision: str | None = None, create_pr: bool = False,
                max_shard_size="50GB", tags=None):
    """Upload exactly the files `save_pretrained` writes (weights, configs, model card, LoRA
    correction) to ``repo_id`` in one commit; same keyword arguments as transformers' ``push_to_hub``."""
    record = public_record(_record(model))
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(model, tmp, record, repo_id=repo_id, card_tags=tags, max_shard_size=max_shard_size,
                        token=token)
        picture = _picture_source(model, record)
        if picture is not None:
            write_card(tmp, record, repo_id, tags=tags, adapter=has_adapter(model), picture_from=picture)
        return upload_folder(tmp, repo_id, token=token, private=private, commit_message=commit_message,
                       commit_description=commit_description, create_pr=create_pr, revision=revision)


def attach_hub_methods(model) -> None:
    """Give ``model`` (an instance) the EvoPress ``save_pretrained`` / ``push_to_hub`` above."""
    model.save_pretrained = types.MethodType(save_pretrained, model)
    model.push_to_hub = types.MethodType(push_to_hub, model)


def read_card_metadata(folder) -> dict:
    """The YAML metadata of a saved model card (for tests and tools)."""
    from huggingface_hub import ModelCard

    return ModelCard(Path(folder, CARD_NAME).read_text(encoding="utf-8")).data.to_dict()
