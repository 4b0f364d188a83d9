"""`latest:<stage>` references: "the newest published output of that stage in this store".

Anywhere a config takes a model or dataset URI (a preset, `--set`, a field of a Prefect form) it may say
`latest:prep` (the newest prepared dataset), `latest:pretrain` / `latest:rl` (the newest model of that
stage), `latest:distill` (the newest student), `latest:eval` (the newest report), `latest:release`, or
`latest:<stage>.<output>` for another output of that stage (`latest:distill.traces`). The registry's
`Stage.output` says which output a bare `latest:<stage>` names: the one the pipeline passes on.

References are resolved to the concrete URI before anything is planned, so the stage's key, its lineage and
its MLflow params are exactly those of a run given that URI by hand, and each resolution is logged
(`dataset: latest:prep -> <store>/prep/<key>/dataset`). Only complete runs count (`RESULT.json` written and
every output still published; `infra.plan.published_results`), newest by publish time.

One reference reads more than "newest": `latest:eval` in a release's `eval_report` is the newest evaluation
that evaluated the model being released (`release.model`), since a report without that model's row cannot
be used.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flows import registry
from infra.contract import ConfigError
from infra.plan import PublishedOutput, published_results
from infra.settings import Settings, get_settings

PREFIX = "latest:"
# (stage, field) -> the field naming the model that the referenced output must have read
EVALUATED_BY = {("release", "eval_report"): "model"}
# what null means in such a field, for the error message
WITHOUT = {("release", "eval_report"): "release without a report (the gate then reads `metrics`)"}


def is_reference(value: Any) -> bool:
    return isinstance(value, str) and value.strip().startswith(PREFIX)


def cli_hint(path: str) -> str:
    """How a CLI user sets the field at `path` (a dotted config path)."""
    return f"--set {path}=<URI>"


def _parse(ref: str, where: str) -> tuple[registry.Stage, str]:
    body = ref.strip()[len(PREFIX):].strip()
    name, _, output = body.partition(".")
    if name not in registry.STAGES:
        raise ConfigError(f"{where}: {ref!r}: unknown stage {name!r}; a reference is latest:<stage> with one of "
                          f"{', '.join(registry.STAGES)}")
    return registry.STAGES[name], output or registry.STAGES[name].output


def find_references(data: Any, path: str = "") -> list[tuple[str, str]]:
    """(dotted path, value) of every `latest:` string in a config (lists indexed: `models.0.uri`)."""
    if is_reference(data):
        return [(path, data)]
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    return [found for k, v in items for found in find_references(v, f"{path}.{k}" if path else str(k))]


def _set(data: Any, path: str, value: str) -> None:
    *parents, last = path.split(".")
    for part in parents:
        data = data[int(part)] if isinstance(data, list) else data[part]
    data[int(last) if isinstance(data, list) else last] = value


def _get(data: dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def _evaluated(run: PublishedOutput, model_uri: str) -> bool:
    from components.refs.lineage import norm_uri

    read = {norm_uri(i["uri"]) for i in (run.result.lineage.get("inputs") or {}).values()
            if isinstance(i, dict) and i.get("uri")}
    return norm_uri(model_uri) in read


def resolve_references(stage: str, data: dict[str, Any], *, hint: Callable[[str], str] = cli_hint,
                       log: Callable[[str], None] | None = None, settings: Settings | None = None) -> dict[str, Any]:
    """A copy of the config `data` of `stage` with every `latest:` reference replaced by its URI; `log` gets
    one line per reference. A reference to an output the store does not hold is a ConfigError naming the
    field, the store and what to run; `hint(path)` says how the user sets the field themselves."""
    import copy

    found = find_references(data)
    if not found:
        return data
    settings = settings or get_settings()
    out = copy.deepcopy(data)
    # fields whose reference depends on another field's value go last (release.eval_report on release.model)
    found.sort(key=lambda item: (stage, item[0]) in EVALUATED_BY)
    for path, ref in found:
        where = f"{stage}.{path}"
        source, output = _parse(ref, where)
        runs = published_results(source.name, settings)
        what = f"no published {source.name} output in {settings.store_uri}"
        model_field = EVALUATED_BY.get((stage, path))
        todo = f"run {source.name} first, or {hint(path)}"
        if model_field and _get(out, model_field):
            from components.refs.models import resolve_model_ref

            model_uri = resolve_model_ref(str(_get(out, model_field)))
            runs = [r for r in runs if _evaluated(r, model_uri)]
            what = (f"no published {source.name} output in {settings.store_uri} evaluated {model_uri} "
                    f"({stage}.{model_field})")
            todo = (f"run {source.name} on it first, or {hint(path)}, or override {path}=null to "
                    f"{WITHOUT[(stage, path)]}")
        if not runs:
            raise ConfigError(f"{where}: {ref} — {what}; {todo}")
        newest = runs[0]
        if output not in newest.result.outputs:
            raise ConfigError(f"{where}: {ref} — the {source.name} output {newest.uri} has no output {output!r} "
                              f"(it has {', '.join(sorted(newest.result.outputs))})")
        uri = newest.result.outputs[output]
        _set(out, path, uri)
        if log:
            log(f"{path}: {ref} -> {uri}")
    return out
