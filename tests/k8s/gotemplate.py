"""A small Go text/template + Helm (sprig) renderer, enough for the templates of helm/moeflow.

There is no `helm` binary on the machines the tests run on, so the chart's structure is checked by
rendering its templates with this subset and parsing the result as YAML. Supported:

- actions `{{ }}` with `{{-`/`-}}` whitespace trimming and `{{/* comments */}}`;
- `if / else if / else / end`, `with / else / end`, `range` (lists and maps, with `$i, $v :=`),
  `define "name"` + `include`, variables (`$x := ...`, `$x = ...`, `$`), fields (`.Values.a.b`,
  `$x.a`), parentheses, pipelines (`a | f b` passes `a` as the last argument of `f`);
- the functions listed in `FUNCTIONS` (the sprig/Helm ones the chart uses), `lookup` (which, as in
  `helm template`, finds nothing) and `.Files.Get`.

Anything else raises `TemplateError`, so a template that strays from the subset fails the tests loudly.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import string
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml


class TemplateError(Exception):
    pass


# ------------------------------------------------------------------------------------------- lexing
ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<str>"(?:[^"\\]|\\.)*")
  | (?P<raw>`[^`]*`)
  | (?P<num>-?\d+(?:\.\d+)?)
  | (?P<decl>:=)
  | (?P<assign>=)
  | (?P<pipe>\|)
  | (?P<lpar>\()
  | (?P<rpar>\))
  | (?P<comma>,)
  | (?P<var>\$[A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)
  | (?P<field>(?:\.[A-Za-z_][A-Za-z0-9_]*)+|\.)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
""", re.X)


def tokenize(src: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(src):
        m = TOKEN.match(src, pos)
        if not m:
            raise TemplateError(f"cannot parse {src[pos:pos + 30]!r} in {{{{ {src} }}}}")
        pos = m.end()
        if m.lastgroup != "ws":
            out.append((m.lastgroup, m.group()))
    return out


def split(text: str) -> list[tuple[str, str]]:
    """[('text', s) | ('action', src)] with the trim markers applied to the neighbouring text."""
    parts: list[tuple[str, str]] = []
    pos, trim_next = 0, False
    for m in ACTION.finditer(text):
        chunk = text[pos:m.start()]
        if trim_next:
            chunk = chunk.lstrip()
        if m.group(1):
            chunk = chunk.rstrip()
        parts.append(("text", chunk))
        parts.append(("action", m.group(2).strip()))
        trim_next = bool(m.group(3))
        pos = m.end()
    tail = text[pos:]
    parts.append(("text", tail.lstrip() if trim_next else tail))
    return parts


# ------------------------------------------------------------------------------------------ parsing
class Node:
    pass


class Text(Node):
    def __init__(self, s: str):
        self.s = s


class Action(Node):
    def __init__(self, pipe: list):
        self.pipe = pipe


class Branch(Node):  # if / with / range
    def __init__(self, kind: str, pipe: list, body: list, orelse: list, vars_: list[str]):
        self.kind, self.pipe, self.body, self.orelse, self.vars = kind, pipe, body, orelse, vars_


def parse_pipeline(tokens: list[tuple[str, str]]) -> tuple[list, list[str], str | None]:
    """-> (commands, declared variables, 'decl'|'assign'|None). A command is a list of operands."""
    names: list[str] = []
    mode = None
    for i, (kind, _) in enumerate(tokens):
        if kind in ("decl", "assign"):
            names = [v for k, v in tokens[:i] if k == "var"]
            mode = kind
            tokens = tokens[i + 1:]
            break
    cmds, cmd, depth, sub = [], [], 0, []
    for kind, val in tokens:
        if depth:
            if kind == "lpar":
                depth += 1
            elif kind == "rpar":
                depth -= 1
                if depth == 0:
                    cmd.append(("paren", parse_pipeline(sub)[0]))
                    sub = []
                    continue
            sub.append((kind, val))
        elif kind == "lpar":
            depth = 1
        elif kind == "pipe":
            cmds.append(cmd)
            cmd = []
        elif kind == "rpar":
            raise TemplateError("unbalanced ')'")
        else:
            cmd.append((kind, val))
    if depth:
        raise TemplateError("unbalanced '('")
    cmds.append(cmd)
    return cmds, names, mode


def parse(text: str, defines: dict[str, list]) -> list[Node]:
    parts = split(text)
    pos = 0

    def block(stop: tuple[str, ...]) -> tuple[list[Node], str]:
        nonlocal pos
        nodes: list[Node] = []
        while pos < len(parts):
            kind, val = parts[pos]
            pos += 1
            if kind == "text":
                if val:
                    nodes.append(Text(val))
                continue
            if val.startswith("/*"):
                continue
            word = val.split(None, 1)[0] if val else ""
            rest = val[len(word):].strip()
            if word in stop or (word == "else" and "else" in stop):
                return nodes, val
            if word in ("if", "with", "range"):
                nodes.append(branch(word, rest))
            elif word == "define":
                name = json.loads(rest)
                body, _ = block(("end",))
                defines[name] = body
            elif word in ("end", "else"):
                raise TemplateError(f"unexpected {{{{ {val} }}}}")
            elif word in ("template", "block", "break", "continue"):
                raise TemplateError(f"{word} is outside the supported subset")
            else:
                nodes.append(Action(parse_pipeline(tokenize(val))))
        if stop:
            raise TemplateError(f"missing {{{{ end }}}} (expected one of {stop})")
        return nodes, ""

    def branch(kind: str, rest: str) -> Branch:
        cmds, names, _ = parse_pipeline(tokenize(rest))
        body, closer = block(("end", "else"))
        orelse: list[Node] = []
        if closer.startswith("else"):
            tail = closer[4:].strip()
            if tail.startswith("if ") and kind == "if":
                orelse = [branch("if", tail[3:])]  # `else if` shares the outer `end`
            else:
                orelse, _ = block(("end",))
        return Branch(kind, cmds, body, orelse, names)

    nodes, _ = block(())
    return nodes


# --------------------------------------------------------------------------------------- evaluation
def truthy(v: Any) -> bool:
    return not (v is None or v is False or v == 0 and not isinstance(v, bool) or v in ("", [], {}))


def to_str(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    if isinstance(v, dict | list):
        raise TemplateError(f"printing a {type(v).__name__} directly (use toYaml/toJson): {v!r}")
    return str(v)


def go_printf(fmt: str, *args: Any) -> str:
    py = re.sub(r"%v", "%s", fmt)
    return py % tuple(to_str(a) if isinstance(a, bool | type(None)) else a for a in args)


def to_yaml(v: Any) -> str:
    return yaml.safe_dump(v, default_flow_style=False, sort_keys=True).rstrip("\n").removesuffix("\n...")


def indent(n: int, s: str) -> str:
    return "\n".join((" " * n + line) if line else line for line in s.split("\n"))


def required(msg: str, v: Any) -> Any:
    if v is None or v == "":
        raise TemplateError(f"required: {msg}")
    return v


def sprig_set(d: dict, k: str, v: Any) -> dict:
    d[k] = v
    return d


def index(v: Any, *keys: Any) -> Any:
    for k in keys:
        v = v.get(k) if isinstance(v, dict) else (v[k] if v is not None else None)
    return v


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "quote": lambda *a: " ".join(json.dumps(to_str(x)) for x in a if x is not None),
    "squote": lambda *a: " ".join(f"'{to_str(x)}'" for x in a if x is not None),
    "default": lambda d, v=None: v if truthy(v) else d,
    "toYaml": to_yaml,
    "toJson": lambda v: json.dumps(v, separators=(",", ":"), sort_keys=True),
    "toPrettyJson": lambda v: json.dumps(v, indent=2, sort_keys=True),
    "fromJson": lambda s: json.loads(s),
    "nindent": lambda n, s: "\n" + indent(n, s),
    "indent": indent,
    "printf": go_printf,
    "trunc": lambda n, s: s[:n] if n >= 0 else s[n:],
    "trimSuffix": lambda suf, s: s.removesuffix(suf),
    "trimPrefix": lambda pre, s: s.removeprefix(pre),
    "lower": lambda s: s.lower(),
    "upper": lambda s: s.upper(),
    "replace": lambda old, new, s: s.replace(old, new),
    "b64enc": lambda s: base64.b64encode(to_str(s).encode()).decode(),
    "b64dec": lambda s: base64.b64decode(s).decode(),
    "randAlphaNum": lambda n: "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(n)),
    "dict": lambda *kv: {kv[i]: kv[i + 1] for i in range(0, len(kv), 2)},
    "list": lambda *xs: list(xs),
    "concat": lambda *lists: [x for xs in lists for x in (xs or [])],
    "set": sprig_set,
    "get": lambda d, k: d.get(k, ""),
    "hasKey": lambda d, k: isinstance(d, dict) and k in d,
    "index": index,
    "lookup": lambda api, kind, ns, name: {},  # no cluster: like `helm template`
    "required": required,
    "urlquery": lambda *a: urllib.parse.quote_plus("".join(to_str(x) for x in a)),
    "eq": lambda a, *bs: any(a == b for b in bs),
    "ne": lambda a, b: a != b,
    "not": lambda v: not truthy(v),
    "empty": lambda v: not truthy(v),
    "len": lambda v: len(v),
    "join": lambda sep, xs: sep.join(to_str(x) for x in xs),
    "toString": to_str,
    "int": lambda v: int(v),
}
LAZY = {"and", "or"}


class Renderer:
    def __init__(self, context: dict[str, Any], defines: dict[str, list[Node]] | None = None):
        self.root = context
        self.defines = defines if defines is not None else {}

    def render(self, text: str, name: str = "template") -> str:
        try:
            nodes = parse(text, self.defines)
            return self.run(nodes, self.root, [{"$": self.root}])
        except TemplateError as exc:
            raise TemplateError(f"{name}: {exc}") from None

    def run(self, nodes: list[Node], dot: Any, scopes: list[dict]) -> str:
        out: list[str] = []
        for node in nodes:
            if isinstance(node, Text):
                out.append(node.s)
            elif isinstance(node, Action):
                cmds, names, mode = node.pipe
                value = self.pipeline(cmds, dot, scopes)
                if mode:
                    self.bind(names, [value], mode, scopes)
                else:
                    out.append(to_str(value))
            else:
                out.append(self.branch(node, dot, scopes))
        return "".join(out)

    def bind(self, names: list[str], values: list[Any], mode: str, scopes: list[dict]) -> None:
        for name, value in zip(names, values, strict=False):
            if mode == "decl":
                scopes[-1][name] = value
            else:
                for scope in reversed(scopes):
                    if name in scope:
                        scope[name] = value
                        break
                else:
                    raise TemplateError(f"assignment to undeclared {name}")

    def branch(self, node: Branch, dot: Any, scopes: list[dict]) -> str:
        value = self.pipeline(node.pipe, dot, scopes)
        if node.kind == "if":
            chosen = node.body if truthy(value) else node.orelse
            return self.run(chosen, dot, [*scopes, {}])
        if node.kind == "with":
            return self.run(node.body, value, [*scopes, {}]) if truthy(value) else self.run(node.orelse, dot,
                                                                                           [*scopes, {}])
        items = list(value.items()) if isinstance(value, dict) else list(enumerate(value or []))
        if isinstance(value, dict):
            items.sort()
        if not items:
            return self.run(node.orelse, dot, [*scopes, {}])
        out = []
        for k, v in items:
            scope: dict[str, Any] = {}
            if len(node.vars) == 2:
                scope[node.vars[0]], scope[node.vars[1]] = k, v
            elif len(node.vars) == 1:
                scope[node.vars[0]] = v
            out.append(self.run(node.body, v, [*scopes, scope]))
        return "".join(out)

    def pipeline(self, cmds: list, dot: Any, scopes: list[dict]) -> Any:
        value: Any = _NOTHING
        for cmd in cmds:
            value = self.command(cmd, dot, scopes, value)
        return None if value is _NOTHING else value

    def command(self, cmd: list, dot: Any, scopes: list[dict], piped: Any) -> Any:
        if not cmd:
            raise TemplateError("empty command")
        head_kind, head = cmd[0]
        if head_kind == "ident" and head in ("true", "false", "nil"):
            return {"true": True, "false": False, "nil": None}[head]
        if head_kind == "ident":
            if head in LAZY:
                return self.lazy(head, cmd[1:], dot, scopes, piped)
            if head == "include":
                args = [self.operand(o, dot, scopes) for o in cmd[1:]] + ([] if piped is _NOTHING else [piped])
                return self.include(*args)
            fn = FUNCTIONS.get(head)
            if fn is None:
                raise TemplateError(f"function {head!r} is outside the supported subset")
            args = [self.operand(o, dot, scopes) for o in cmd[1:]] + ([] if piped is _NOTHING else [piped])
            try:
                return fn(*args)
            except TemplateError:
                raise
            except Exception as exc:
                raise TemplateError(f"{head}{tuple(args)!r}: {exc}") from exc
        value = self.operand(cmd[0], dot, scopes)
        if callable(value):  # a method such as .Files.Get
            args = [self.operand(o, dot, scopes) for o in cmd[1:]] + ([] if piped is _NOTHING else [piped])
            return value(*args)
        if len(cmd) > 1 or piped is not _NOTHING:
            raise TemplateError(f"cannot give arguments to {head}")
        return value

    def lazy(self, fn: str, operands: list, dot: Any, scopes: list[dict], piped: Any) -> Any:
        thunks = [lambda o=o: self.operand(o, dot, scopes) for o in operands]
        if piped is not _NOTHING:
            thunks.append(lambda: piped)
        value: Any = None
        for thunk in thunks:
            value = thunk()
            if (fn == "and" and not truthy(value)) or (fn == "or" and truthy(value)):
                return value
        return value

    def operand(self, op: tuple, dot: Any, scopes: list[dict]) -> Any:
        kind, val = op
        if kind == "str":
            return json.loads(val)
        if kind == "raw":
            return val[1:-1]
        if kind == "num":
            return float(val) if "." in val else int(val)
        if kind == "paren":
            return self.pipeline(val, dot, scopes)
        if kind == "field":
            return self.path(dot, val.split(".")[1:] if val != "." else [])
        if kind == "var":
            name, *path = val.split(".")
            for scope in reversed(scopes):
                if name in scope:
                    return self.path(scope[name], path)
            raise TemplateError(f"undefined variable {name}")
        if kind == "ident" and val in ("true", "false", "nil"):
            return {"true": True, "false": False, "nil": None}[val]
        if kind == "ident" and val in FUNCTIONS:
            return FUNCTIONS[val]()  # a function used as a value, e.g. `default dict`
        raise TemplateError(f"unexpected {val!r}")

    @staticmethod
    def path(value: Any, path: list[str]) -> Any:
        for part in path:
            if isinstance(value, dict):
                value = value.get(part)
            elif value is None:
                return None
            else:
                attr = getattr(value, part, None)
                if attr is None:
                    raise TemplateError(f"no field {part} on {type(value).__name__}")
                value = attr
        return value

    def include(self, name: str, data: Any = None) -> str:
        if name not in self.defines:
            raise TemplateError(f"include of undefined template {name!r}")
        return self.run(self.defines[name], data, [{"$": data}])


_NOTHING = object()


# ------------------------------------------------------------------------------------------ the chart
class Files:
    """`.Files` of a chart: `Get` reads a file of the chart directory (Helm's semantics: '' if absent)."""

    def __init__(self, root: Path):
        self.root = root

    def Get(self, name: str) -> str:  # noqa: N802 (Helm's spelling)
        p = self.root / name
        return p.read_text() if p.is_file() else ""


def deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def render_chart(chart_dir: Path, values: dict | None = None, *, release: str = "moeflow",
                 namespace: str = "ml") -> dict[str, str]:
    """{template path: rendered text} for every template of the chart (helpers included as defines)."""
    chart = yaml.safe_load((chart_dir / "Chart.yaml").read_text())
    merged = deep_merge(yaml.safe_load((chart_dir / "values.yaml").read_text()) or {}, values or {})
    context = {
        "Values": merged,
        "Release": {"Name": release, "Namespace": namespace, "Service": "Helm", "IsInstall": True,
                    "IsUpgrade": False, "Revision": 1},
        "Chart": {"Name": chart["name"], "Version": chart["version"], "AppVersion": chart.get("appVersion")},
        "Files": Files(chart_dir),
        "Capabilities": {"KubeVersion": {"Version": "v1.29.0"}},
    }
    renderer = Renderer(context)
    templates = sorted((chart_dir / "templates").glob("*"))
    for t in templates:  # helpers first: their defines must exist before anything includes them
        if t.name.startswith("_"):
            renderer.render(t.read_text(), t.name)
    return {f"templates/{t.name}": renderer.render(t.read_text(), t.name)
            for t in templates if not t.name.startswith("_")}
