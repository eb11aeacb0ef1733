"""A small kustomize renderer for deploy/k8s: enough of `kubectl kustomize` for the files there.

Supported (and nothing else: anything more in a kustomization.yaml is refused, so the files
cannot drift into what this renders differently from kustomize): `resources` (files and
directories with their own kustomization.yaml), `namespace`, `labels` (pairs added to
metadata.labels, selectors untouched: kustomize's default `includeSelectors: false`), `images`
(newName/newTag by image name) and `patches` with an inline JSON 6902 patch and a kind/name target.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

KNOWN = {"apiVersion", "kind", "resources", "namespace", "labels", "images", "patches"}


def render(directory: str | Path) -> list[dict]:
    """The manifests `kubectl kustomize DIRECTORY` prints, as dicts, in resource order."""
    directory = Path(directory)
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(spec) - KNOWN
    if unknown:
        raise ValueError(
            f"{directory}/kustomization.yaml: {sorted(unknown)} not supported by tests/kustomize.py"
        )
    docs: list[dict] = []
    for entry in spec.get("resources", []):
        path = directory / entry
        if path.is_dir():
            docs += render(path)
        else:
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for patch in spec.get("patches", []):
        target = patch["target"]
        matches = [d for d in docs if d["kind"] == target["kind"] and d["metadata"]["name"] == target["name"]]
        if not matches:
            raise ValueError(f"{directory}: patch target {target} matches no resource")
        for doc in matches:
            for op in yaml.safe_load(patch["patch"]):
                apply_json_patch(doc, op)
    for doc in docs:
        if "namespace" in spec:
            doc["metadata"]["namespace"] = spec["namespace"]
        for label in spec.get("labels", []):
            doc["metadata"].setdefault("labels", {}).update(label["pairs"])
            if label.get("includeSelectors") or label.get("includeTemplates"):
                raise ValueError("labels: only metadata labels are supported")
        for image in spec.get("images", []):
            set_image(doc, image)
    return docs


def apply_json_patch(doc: dict, op: dict) -> None:
    """One RFC 6902 operation (add, replace, remove) on doc, in place."""
    *parents, last = [part.replace("~1", "/").replace("~0", "~") for part in op["path"].split("/")[1:]]
    node = doc
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if op["op"] == "remove":
        del node[int(last) if isinstance(node, list) else last]
    elif op["op"] == "replace":
        key = int(last) if isinstance(node, list) else last
        node[key]  # noqa: B018  (replace needs the target to exist: KeyError/IndexError otherwise)
        node[key] = copy.deepcopy(op["value"])
    elif op["op"] == "add":
        if isinstance(node, list):
            node.insert(len(node) if last == "-" else int(last), copy.deepcopy(op["value"]))
        else:
            node[last] = copy.deepcopy(op["value"])
    else:
        raise ValueError(f"JSON patch op {op['op']!r} not supported")


def set_image(doc: dict, image: dict) -> None:
    """kustomize `images`: every container whose image name (tag stripped) is image['name']."""
    pod = doc.get("spec", {}).get("template", {}).get("spec", {})
    for container in pod.get("containers", []) + pod.get("initContainers", []):
        name, _, tag = container["image"].partition(":")
        if name == image["name"]:
            container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
