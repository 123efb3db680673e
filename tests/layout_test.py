"""The package's import graph has no cycle, counting imports inside functions too."""

import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _modules() -> dict[str, str]:
  out = {}
  for d, _, files in os.walk(os.path.join(REPO, "repsim_jax")):
    for f in files:
      if f.endswith(".py"):
        name = os.path.relpath(os.path.join(d, f), REPO)[:-3].replace(os.sep, ".")
        out[name.removesuffix(".__init__")] = os.path.join(d, f)
  return out


def import_graph() -> dict[str, set[str]]:
  """{module: repsim_jax modules it imports}. Importing `a.b.c` from outside package `a.b` also
  runs `a.b`'s __init__, so that is an edge too; a package's own modules importing each other
  do not re-enter it."""
  mods = _modules()
  graph = {}
  for mod, path in mods.items():
    names = set()
    for node in ast.walk(ast.parse(open(path).read())):
      if isinstance(node, ast.Import):
        names |= {a.name for a in node.names}
      elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
        names |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module
                  for a in node.names}
    edges = set()
    for name in (n for n in names if n in mods):
      parts = name.split(".")
      parents = {".".join(parts[:i]) for i in range(2, len(parts))}
      edges |= {name} | {p for p in parents if p in mods and not (mod == p or
                                                                mod.startswith(p + "."))}
    graph[mod] = edges - {mod}
  return graph


def _cycle(graph):
  state, stack = {}, []

  def visit(u):
    state[u] = "open"
    stack.append(u)
    for v in sorted(graph[u]):
      if state.get(v) == "open":
        return stack[stack.index(v):] + [v]
      if v not in state:
        found = visit(v)
        if found:
          return found
    stack.pop()
    state[u] = "done"
    return None

  for m in sorted(graph):
    if m not in state:
      found = visit(m)
      if found:
        return found
  return None


def test_no_import_cycle():
  graph = import_graph()
  assert "repsim_jax.train" in graph and graph["repsim_jax.train"]
  assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_check_finds_a_cycle():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"b"}, "b": set()}) is None
