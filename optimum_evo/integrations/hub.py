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

The same functions work on any EvoPress model: `save_pretrained`, `push_to_hub`;
`model_card` returns the card's text.

Examples:
    >>> model.save_pretrained("compressed")                                # doctest: +SKIP
    >>> print(open("compressed/README.md").read()[:200])                   # doctest: +SKIP
    >>> model.push_to_hub("me/smollm2-evopress-3bit", private=True)        # doctest: +SKIP
"""

from __future__ import annotations

import tempfile
import types
from pathlib import Path

from ..card import model_card as _card_text
from ..checkpoint import CARD_NAME, check_evopress_model, has_adapter, save_checkpoint
from ..record import read_record

__all__ = ["attach_hub_methods", "model_card", "push_to_hub", "read_card_metadata", "save_pretrained", "upload_folder"]


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


def save_pretrained(model, save_directory, **kwargs):
    """Write the EvoPress checkpoint of ``model`` (`optimum_evo.checkpoint.save_checkpoint`).
    ``push_to_hub=True`` uploads the folder afterwards (``repo_id``, ``commit_message``,
    ``create_pr``, ``private``, ``token`` as in transformers)."""
    record = _record(model)
    push = kwargs.pop("push_to_hub", False)
    hub = {k: kwargs.pop(k) for k in ("repo_id", "commit_message", "create_pr", "private") if k in kwargs}
    token = kwargs.get("token")
    save_checkpoint(model, save_directory, record, repo_id=hub.get("repo_id") if push else None, **kwargs)
    if push:
        repo_id = hub.get("repo_id", Path(save_directory).name)
        return upload_folder(save_directory, repo_id, token=token, private=hub.get("private"),
                       commit_message=hub.get("commit_message"), create_pr=hub.get("create_pr", False))
    return None


def upload_folder(folder, repo_id, token=None, private=None, commit_message=None, commit_description=None,
                  create_pr=False, revision=None):
    """Create the repository ``repo_id`` if needed and upload every file of ``folder`` to it in one
    commit (public ``huggingface_hub`` APIs: ``HfApi.create_repo`` and ``HfApi.create_commit``)."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    folder = Path(folder)
    operations = [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p))
                  for p in sorted(folder.rglob("*")) if p.is_file()]
    return api.create_commit(repo_id=repo_id, operations=operations,
                             commit_message=commit_message or "Upload EvoPress-compressed model (optimum-evo)",
                             commit_description=commit_description, token=token, create_pr=create_pr,
                             revision=revision)


def push_to_hub(model, repo_id: str, *, commit_message: str | None = None, commit_description: str | None = None,
                private: bool | None = None, token=None, revision: str | None = None, create_pr: bool = False,
                max_shard_size="50GB", tags=None):
    """Upload exactly the files `save_pretrained` writes (weights, configs, model card, LoRA
    correction) to ``repo_id`` in one commit; same keyword arguments as transformers' ``push_to_hub``."""
    record = _record(model)
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(model, tmp, record, repo_id=repo_id, card_tags=tags, max_shard_size=max_shard_size,
                        token=token)
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
