"""Counting a compiled program's work from its HLO text (`compiled.as_text()`: the per-device program after SPMD
partitioning), for rrjax.cost. `python -m rrjax.hlo_count FILE.hlo` prints the count and the heaviest ops.

- FLOPs are the matrix units' work: 2 x every multiply-add of each `dot` and `convolution` (XLA's own rule for
  convolutions: the valid window positions only), inside fusions too. Elementwise ops are not counted (they run
  on the vector units, not at the bf16 matrix peak). XLA's `cost_analysis()` counts a while loop's body once;
  here each body is multiplied by its trip count: the `known_trip_count` XLA:CPU writes into the while's
  backend_config, else the trip count read off the loop condition (`i < N` on a tuple element that the loop
  starts at a constant and steps by the constant the body adds, as every jax scan and fori_loop lowers and the
  TPU compiler's windowed-einsum loops step by 2; the TPU compiler writes no known_trip_count),
  else (a loop that exits on data: the engine's decode loop) the body counts once, i.e. per iteration, and
  `counted_note` says so.
- HBM bytes are each top-level op's operands and outputs (fusions as one op), loops multiplied alike, where the
  array lives in HBM: arrays the TPU compiler placed in on-chip memory (layout memory space `S(n)`, n > 0) are
  not HBM traffic, and a copy into such memory counts its HBM read. A fusion that only slices a parameter reads
  the slice (a scanned layer's weights); a fusion that updates a parameter in place writes the update.
- Custom kernels are counted by the analytic attention formula, never by their bodies (which XLA cannot see):
  splash (forward 2 matmuls, dq 3, dkv 4, over the causal query-key pairs), the ragged paged kernel (queries x
  live context; its HBM bytes are q, out and the live KV, not the allocated pages), and the cuDNN stand-in that
  cpu:N builds as chunked attention (ops under rrjax.model.attention.STAND_IN_SCOPE: its dots scaled from the
  full blocks it computes to the causal pairs, its traffic not counted: cuDNN keeps scores on chip).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

_ARRAY = re.compile(r"\b(pred|bf16|f8e\w+|[fsuc]\d+|token)\[([\d,]*)\](\{[^}]*\})?")
_INSTR = re.compile(r"^\s+(?:ROOT )?%([\w.\-]+) = (.*)$")
_HEAD = re.compile(r"^(?:ENTRY )?%([\w.\-]+) ")
_NAME = re.compile(r"%([\w.\-]+)")
_ITEM = {"pred": 1, "bf16": 2, "token": 0}
FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "add-dependency",
        "partition-id", "replica-id", "opt-barrier", "copy-done", "async-done", "all-gather-done", "all-reduce-done",
        "collective-permute-done", "send-done", "recv-done", "while", "call", "conditional", "async-start",
        "async-update"}
# rrjax.model.attention.STAND_IN_SCOPE + _T{T}_S{S}: the cuDNN stand-in's ops (a named scope in their metadata)
_STAND_IN = re.compile(r"cudnn_stand_in_T(\d+)_S(\d+)")


def _itemsize(dtype: str) -> float:
  if dtype in _ITEM:
    return _ITEM[dtype]
  if dtype.startswith("f8"):
    return 1
  bits = int(re.sub(r"\D", "", dtype) or 8)
  return bits / 8 * (2 if dtype.startswith("c") else 1)


@dataclasses.dataclass
class _Instr:
  name: str
  type: str
  opcode: str
  operands: list[str]
  attrs: str
  args: str  # the text between the opcode's parentheses (a parameter's index, a constant's value)

  def arrays(self) -> list[tuple[str, tuple[int, ...], bool]]:
    """(dtype, dims, in HBM) of each array of the output type."""
    out = []
    for m in _ARRAY.finditer(self.type):
      dims = tuple(int(d) for d in m.group(2).split(",") if d)
      layout = m.group(3) or ""
      space = re.search(r"S\((\d+)\)", layout)
      out.append((m.group(1), dims, not (space and int(space.group(1)) > 0)))
    return out

  def dims(self) -> tuple[int, ...]:
    arrays = self.arrays()
    return arrays[0][1] if arrays else ()


def _matching(s: str, start: int) -> int:
  """Index just after the bracket closing the one at s[start]."""
  pairs = {"(": ")", "{": "}", "[": "]"}
  depth, quote = 0, False
  for i in range(start, len(s)):
    ch = s[i]
    if ch == '"':
      quote = not quote
    elif quote:
      continue
    elif ch in pairs:
      depth += 1
    elif ch in ")}]":
      depth -= 1
      if depth == 0:
        return i + 1
  return len(s)


def _parse_instr(line: str) -> _Instr | None:
  m = _INSTR.match(line)
  if not m:
    return None
  name, rest = m.group(1), m.group(2)
  if rest.startswith("("):
    end = _matching(rest, 0)
  else:
    end = rest.find(" ")
  typ, rest = rest[:end], rest[end:].lstrip()
  op = re.match(r"([\w\-]+)\(", rest)
  if not op:
    return None
  close = _matching(rest, op.end() - 1)
  args = rest[op.end():close - 1]
  return _Instr(name, typ, op.group(1), _NAME.findall(args), rest[close:], args)


def _bytes(arrays, hbm_only: bool = True) -> float:
  return sum(math.prod(d) * _itemsize(t) for t, d, hbm in arrays if hbm or not hbm_only)


@dataclasses.dataclass
class Counted:
  flops: float = 0.0
  hbm_bytes: float = 0.0
  kernels: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  loops: int = 0  # while loops multiplied by a trip count
  open_loops: int = 0  # while loops whose trip count depends on data (counted once: per iteration)

  def add(self, other: Counted, times: float = 1.0) -> None:
    self.flops += times * other.flops
    self.hbm_bytes += times * other.hbm_bytes
    for k, v in other.kernels.items():
      self.kernels[k] += v * times
    self.loops += other.loops
    self.open_loops += other.open_loops


class _Module:
  def __init__(self, text: str, live_context: int | None):
    self.comps: dict[str, list[_Instr]] = {}
    self.entry = None
    current, pending = None, []

    def flush():
      if current is not None and pending:
        ins = _parse_instr(" ".join(pending))
        if ins:
          current.append(ins)
      pending.clear()

    for line in text.splitlines():  # an instruction's attributes may span lines (kernels' frontend_attributes)
      if line.strip() == "}":
        flush()
        current = None
      elif not line.startswith(" ") and _HEAD.match(line) and line.rstrip().endswith("{"):
        flush()
        name = _HEAD.match(line).group(1)
        current = self.comps.setdefault(name, [])
        if line.startswith("ENTRY"):
          self.entry = name
      elif _INSTR.match(line):
        flush()
        pending.append(line)
      elif pending:
        pending.append(line.strip())
    flush()
    self.by_name = {i.name: i for instrs in self.comps.values() for i in instrs}
    self.live_context = live_context
    self._memo: dict[str, Counted] = {}

  def shape(self, name: str) -> tuple[int, ...]:
    ins = self.by_name.get(name)
    return ins.dims() if ins else ()

  def cost(self, comp: str, fused: bool = False, stand_in: tuple[int, int] | None = None) -> Counted:
    """`stand_in`: (T, S) of the cuDNN stand-in whose loop this computation is the body of."""
    key = (comp, fused, stand_in)
    if key not in self._memo:
      total = Counted()
      for ins in self.comps.get(comp, ()):
        total.add(self._instr(ins, fused, stand_in))
      self._memo[key] = total
    return self._memo[key]

  # -- one instruction

  def _called(self, ins: _Instr, attr: str) -> str | None:
    m = re.search(attr + r"=%([\w.\-]+)", ins.attrs)
    return m.group(1) if m else None

  def _instr(self, ins: _Instr, fused: bool, stand_in: tuple[int, int] | None = None) -> Counted:
    out = Counted()
    op = ins.opcode
    scale = 1.0
    own = _STAND_IN.search(ins.attrs)
    stand_in = (int(own.group(1)), int(own.group(2))) if own else stand_in
    if stand_in:  # the cuDNN stand-in computes full query blocks against every key: count the causal pairs
      T, S = stand_in
      scale = causal_pairs(T, S) / (T * S)
    if op == "dot":
      out.flops = scale * self._dot_flops(ins)
    elif op == "convolution":
      out.flops = scale * self._conv_flops(ins)
    elif op == "fusion":
      inner = self.cost(self._called(ins, "calls"), fused=True, stand_in=stand_in)
      out.flops, out.kernels = inner.flops, collections.Counter(inner.kernels)
    elif op == "while":
      trips = self._trip_count(ins)
      body = Counted()
      body.add(self.cost(self._called(ins, "body"), stand_in=stand_in))
      body.add(self.cost(self._called(ins, "condition"), stand_in=stand_in))
      out.add(body, trips or 1)
      out.loops += 1 if trips else 0
      out.open_loops += 0 if trips else 1
      return out
    elif op in ("call", "async-start"):
      called = self._called(ins, "calls") or self._called(ins, "to_apply")
      if called:
        out.add(self.cost(called, fused, stand_in))
      return out
    elif op == "conditional":
      branches = _NAME.findall((re.search(r"branch_computations=\{([^}]*)\}", ins.attrs) or [None, ""])[1])
      branches += [b for b in (self._called(ins, "true_computation"), self._called(ins, "false_computation")) if b]
      costs = [self.cost(b, fused, stand_in) for b in branches]
      if costs:
        out.add(max(costs, key=lambda c: (c.flops, c.hbm_bytes)))
      return out
    elif op == "custom-call":
      self._kernel(ins, out)  # others (AllocateBuffer, layout markers) neither compute nor move data
      return out
    if stand_in and (out.flops or not fused):
      out.kernels["cudnn stand-in (causal pairs)"] += 1
    if not fused and op not in FREE and not stand_in:  # cuDNN keeps its scores on chip: no traffic counted
      out.hbm_bytes = self._traffic(ins)
    return out

  def _kernel(self, ins: _Instr, out: Counted) -> None:
    """A Pallas kernel's analytic cost (see the module docstring), added to `out`."""
    if 'custom_call_target="tpu_custom_call"' not in ins.attrs:
      return
    floats = [(o, self.by_name[o].arrays()[0]) for o in ins.operands if o in self.by_name and
              self.by_name[o].arrays() and self.by_name[o].arrays()[0][0] in ("bf16", "f16", "f32")]
    name = re.sub(r"\.\d+$", "", ins.name)
    if "splash" in name and len(floats) >= 2:
      (_, (_, q, _)), (_, (_, k, _)) = floats[:2]
      matmuls = 3 if "_dq" in name else 4 if "_dkv" in name else 2
      out.flops = 2.0 * matmuls * math.prod(q[:-2]) * causal_pairs(q[-2], k[-2]) * q[-1]
      out.hbm_bytes = sum(_bytes(self.by_name[o].arrays()) for o in ins.operands if o in self.by_name)
      out.hbm_bytes += _bytes(ins.arrays())
      kind = "splash_dq" if "_dq" in name else "splash_dkv" if "_dkv" in name else "splash_fwd"
    elif "ragged_paged_attention" in name and len(floats) >= 2:
      (_, (qt, q, _)), (_, (kt, pages, _)) = floats[:2]
      tokens, heads, width = q[0], math.prod(q[1:-1]), q[-1]
      live = self.live_context
      kv = tokens * live * math.prod(pages[2:]) * _itemsize(kt) if live else _bytes(self.by_name[floats[1][0]].arrays())
      out.flops = 4.0 * tokens * heads * width * (live or pages[0] * pages[1] // max(tokens, 1))
      out.hbm_bytes = 2 * _bytes([(qt, q, True)]) + kv
      kind = "ragged_paged_attention" + ("" if live else " (allocated pages)")
    else:
      out.hbm_bytes = _bytes(ins.arrays()) + sum(_bytes(self.by_name[o].arrays()) for o in ins.operands
                                                  if o in self.by_name)
      kind = f"{name} (bytes only)"
    out.kernels[kind] += 1

  def _dot_flops(self, ins: _Instr) -> float:
    lhs = self.shape(ins.operands[0])
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.attrs)
    k = math.prod(lhs[int(d)] for d in contracting.group(1).split(",") if d) if contracting else 1
    return 2.0 * math.prod(ins.dims()) * k

  def _conv_flops(self, ins: _Instr) -> float:
    """XLA's HloCostAnalysis::HandleConvolution: multiply-adds at the valid window positions only."""
    lhs, rhs, res = self.shape(ins.operands[0]), self.shape(ins.operands[1]), ins.dims()
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", ins.attrs)
    lhs_l, rhs_l, out_l = labels.groups()
    spatial = sorted(c for c in lhs_l if c.isdigit())
    window = re.search(r"window=\{([^}]*)\}", ins.attrs)
    fields = dict(kv.split("=") for kv in window.group(1).split()) if window else {}

    def per_dim(key, default):
      return [int(x) for x in fields[key].split("x")] if key in fields else [default] * len(spatial)

    pads = [tuple(int(p) for p in x.split("_")) for x in fields["pad"].split("x")] if "pad" in fields else \
        [(0, 0)] * len(spatial)
    stride, base, wdil = per_dim("stride", 1), per_dim("lhs_dilate", 1), per_dim("rhs_dilate", 1)
    valid = 1
    for i, s in enumerate(spatial):
      k_lim, o_lim, i_lim = rhs[rhs_l.index(s)], res[out_l.index(s)], lhs[lhs_l.index(s)]
      count = 0
      for kk in range(k_lim):
        for oo in range(o_lim):
          u = oo * stride[i] - pads[i][0] + kk * wdil[i]
          if u % base[i] == 0 and 0 <= u // base[i] < i_lim:
            count += 1
      valid *= count
    fgc = int((re.search(r"feature_group_count=(\d+)", ins.attrs) or [0, 1])[1])
    bgc = int((re.search(r"batch_group_count=(\d+)", ins.attrs) or [0, 1])[1])
    in_f, out_f, batch = lhs[lhs_l.index("f")], res[out_l.index("f")], lhs[lhs_l.index("b")]
    return 2.0 * (in_f // fgc) * out_f * (batch // bgc) * valid

  def _trip_count(self, ins: _Instr) -> int | None:
    known = re.search(r'known_trip_count":\{"n":"(\d+)"', ins.attrs)
    if known:
      return int(known.group(1))
    cond = self.comps.get(self._called(ins, "condition"), [])
    if not cond:
      return None
    root = cond[-1]
    if root.opcode == "fusion":  # XLA:CPU wraps the compare: look inside, mapping parameters to operands
      inner = self.comps.get(self._called(root, "calls"), [])
      if not inner or inner[-1].opcode != "compare":
        return None
      outer = {i.name: root.operands[int(i.args)] for i in inner if i.opcode == "parameter"}
      a, b = (outer.get(n, n) for n in inner[-1].operands[:2])
      direction = inner[-1].attrs
    elif root.opcode == "compare":
      a, b = root.operands[:2]
      direction = root.attrs
    else:
      return None
    if "direction=LT" not in direction:
      return None
    gte, limit = self.by_name.get(a), self.by_name.get(b)
    if not gte or not limit or gte.opcode != "get-tuple-element" or limit.opcode != "constant":
      return None
    n = _constant(limit)
    if n is None:
      return None
    index = int(re.search(r"index=(\d+)", gte.attrs).group(1))
    start = 0
    init = self.by_name.get(ins.operands[0]) if ins.operands else None
    if init is not None and init.opcode == "tuple" and index < len(init.operands):
      first = self.by_name.get(init.operands[index])
      if first is not None and first.opcode == "constant":
        start = _constant(first) or 0
    step = self._step(ins, index)
    return max(-(-(n - start) // step), 0)

  def _step(self, ins: _Instr, index: int) -> int:
    """What the loop body adds to its counter (tuple element `index`): 1 unless the body's root sets it to
    `counter + constant` (the TPU compiler's windowed-einsum loops take two steps of a collective matmul per
    iteration and add 2: counting them by 1 doubled those matmuls)."""
    body = self.comps.get(self._called(ins, "body"), [])
    root = body[-1] if body else None
    if root is None or root.opcode != "tuple" or index >= len(root.operands):
      return 1
    update = self.by_name.get(root.operands[index])
    if update is None or update.opcode != "add":
      return 1
    parts = [self.by_name.get(o) for o in update.operands[:2]]
    if None in parts:
      return 1
    counter = [p for p in parts if p.opcode == "get-tuple-element" and re.search(rf"\bindex={index}\b", p.attrs)]
    constant = [_constant(p) for p in parts if p.opcode == "constant"]
    return constant[0] if counter and constant and constant[0] and constant[0] > 0 else 1

  # -- memory traffic

  def _traffic(self, ins: _Instr) -> float:
    outputs = ins.arrays()
    if ins.opcode == "copy-start":  # prefetch into on-chip memory: one HBM read of the source
      return sum(_bytes(self.by_name[o].arrays()) for o in ins.operands if o in self.by_name)
    if ins.opcode == "slice-start":  # (operand, slice, context): an asynchronous copy of the slice
      return _bytes(outputs[1:2], hbm_only=False)
    if ins.opcode.endswith("-done"):  # the -start counted the transfer
      return 0.0
    operands = [self.by_name[o].arrays() if o in self.by_name else [] for o in ins.operands]
    if ins.opcode == "fusion":
      return self._fusion_traffic(ins, operands, outputs)
    if ins.opcode in ("dynamic-slice", "slice", "gather"):
      return 2 * _bytes(outputs) if operands and any(h for *_, h in operands[0]) else _bytes(outputs)
    if ins.opcode == "dynamic-update-slice":
      return 2 * _bytes(operands[1]) if len(operands) > 1 else 0.0
    return sum(_bytes(a) for a in operands) + _bytes(outputs)

  def _fusion_traffic(self, ins: _Instr, operands, outputs) -> float:
    inner = self.comps.get(self._called(ins, "calls"), [])
    params = {int(i.args): i.name for i in inner if i.opcode == "parameter"}
    total = 0.0
    in_place = set()
    root = inner[-1] if inner else None
    roots = [self.by_name.get(o) for o in root.operands] if root is not None and root.opcode == "tuple" else [root]
    written = 0.0
    for r, arrays in zip(roots, _split_outputs(outputs, len(roots))):
      # an in-place update (a KV cache's new position): the buffer is neither read nor written whole
      update_at = {"dynamic-update-slice": 1, "scatter": 2}.get(r.opcode if r is not None else None)
      if update_at is not None and len(r.operands) > update_at:
        in_place.add(r.operands[0])
        update = self.by_name.get(r.operands[update_at])
        written += _bytes([(t, d, h) for (t, _, h), (_, d, _) in zip(arrays, update.arrays())]) if update else 0
      else:
        written += _bytes(arrays)
    for idx, arrays in enumerate(operands):
      p = params.get(idx)
      if not any(h for *_, h in arrays) or p in in_place:
        continue
      sliced = self._sliced_read(inner, p) if p is not None else None
      total += _bytes(arrays) if sliced is None else sliced
    return total + written

  def _sliced_read(self, inner: list[_Instr], param: str) -> float | None:
    """Bytes a fused computation reads of its parameter `param` when it only slices it (a scanned layer's
    weights: the layer's slice), through bitcasts and nested fusions; None when it reads it whole."""
    users = collections.defaultdict(list)
    for i in inner:
      for o in i.operands:
        users[o].append(i)
    names = _aliases(param, users)
    readers = _through_bitcasts(param, users)
    if not readers:
      return None
    total = 0.0
    for u in readers:
      if u.opcode in ("dynamic-slice", "slice", "gather") and u.operands and u.operands[0] in names:
        total += _bytes(u.arrays(), hbm_only=False)
      elif u.opcode == "fusion":
        nested = self.comps.get(self._called(u, "calls"), [])
        nested_params = {int(i.args): i.name for i in nested if i.opcode == "parameter"}
        reads = [self._sliced_read(nested, nested_params.get(k)) for k, o in enumerate(u.operands) if o in names]
        if not reads or any(r is None for r in reads):
          return None
        total += sum(reads)
      else:
        return None
    return total


def _split_outputs(outputs, n):
  if n == 1:
    return [outputs]
  return [[a] for a in outputs[:n]] + [[]] * max(0, n - len(outputs))


def _aliases(name, users) -> set[str]:
  out, todo = {name}, [name]
  while todo:
    for u in users.get(todo.pop(), ()):
      if u.opcode == "bitcast" and u.name not in out:
        out.add(u.name)
        todo.append(u.name)
  return out


def _through_bitcasts(name, users) -> list:
  return [u for a in _aliases(name, users) for u in users.get(a, ()) if u.opcode != "bitcast"]


def _constant(ins: _Instr) -> int | None:
  return int(ins.args) if re.fullmatch(r"-?\d+", ins.args.strip()) else None


def causal_pairs(T: int, S: int) -> int:
  """Query-key pairs of causal attention, queries the last T of S positions."""
  T = min(T, S)
  return T * (S - T) + T * (T + 1) // 2


def count_hlo(text: str, live_context: int | None = None) -> Counted:
  """FLOPs and HBM bytes of one compiled program's HLO text (see the module docstring). `live_context`: the live
  keys per sequence the ragged paged kernel reads (decode), where the compiled program cannot know it."""
  module = _Module(text, live_context)
  if module.entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  return module.cost(module.entry)


def counted_note(c: Counted) -> str:
  """How the count was made, in a few words (the `counted` field)."""
  parts = [f"{c.loops} loop(s) x trip counts"]
  if c.open_loops:
    parts.append(f"{c.open_loops} data-dependent loop(s) once (per iteration)")
  kernels = sorted({k for k in c.kernels})
  if kernels:
    parts.append("analytic " + ", ".join(kernels))
  return "; ".join(parts)


def breakdown(text: str, top: int = 10, live_context: int | None = None) -> list[tuple[str, str, float, float]]:
  """The `top` instructions by HBM bytes, loops multiplied: [(name, opcode, flops, hbm_bytes)], what to read
  when a ratio is high (python -m rrjax.hlo_count FILE.hlo prints it)."""
  module = _Module(text, live_context)
  times = collections.Counter({module.entry: 1.0})
  scope = {module.entry: None}  # the cuDNN stand-in each computation runs inside, as cost() passes it on
  order = [module.entry]
  for comp in order:  # computations in call order from the entry: each one's runs per program run
    for ins in module.comps.get(comp, ()):
      called = []
      if ins.opcode == "while":
        trips = module._trip_count(ins) or 1
        called = [(module._called(ins, "body"), trips), (module._called(ins, "condition"), trips)]
      elif ins.opcode in ("call", "async-start"):
        called = [(module._called(ins, "calls") or module._called(ins, "to_apply"), 1)]
      elif ins.opcode == "conditional":
        called = [(b, 1) for b in _NAME.findall((re.search(r"branch_computations=\{([^}]*)\}", ins.attrs)
                                                 or [None, ""])[1])]
      own = _STAND_IN.search(ins.attrs)
      for c, n in called:
        if c:
          if c not in times:
            order.append(c)
          times[c] += times[comp] * n
          scope[c] = (int(own.group(1)), int(own.group(2))) if own else scope[comp]
  rows = []
  for comp in order:
    for ins in module.comps.get(comp, ()):
      if ins.opcode in ("while", "call", "async-start", "conditional"):
        continue
      c = module._instr(ins, False, scope[comp])
      if c.flops or c.hbm_bytes:
        rows.append((ins.name, ins.opcode, c.flops * times[comp], c.hbm_bytes * times[comp]))
  return sorted(rows, key=lambda r: -r[3])[:top]


def main(argv=None) -> int:
  """python -m rrjax.hlo_count FILE.hlo [--top N]: the count of a saved compiled HLO (`compiled.as_text()`)."""
  import argparse
  p = argparse.ArgumentParser(prog="python -m rrjax.hlo_count", description=main.__doc__)
  p.add_argument("hlo")
  p.add_argument("--top", type=int, default=15)
  p.add_argument("--live-context", type=int, default=None)
  args = p.parse_args(argv)
  text = open(args.hlo).read()
  c = count_hlo(text, args.live_context)
  print(f"{c.flops:.4g} FLOPs, {c.hbm_bytes:.4g} HBM bytes per device; {counted_note(c)}")
  for name, op, flops, nbytes in breakdown(text, args.top, args.live_context):
    print(f"{nbytes:>12.4g} B {flops:>12.4g} FLOP  {op:<18} {name}")
  return 0


if __name__ == "__main__":
  from rrjax import cli
  cli.run(main, prog="rrjax.hlo_count")
