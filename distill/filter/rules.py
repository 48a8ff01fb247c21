"""Label-noise rules from top-K predictions: pure numpy, streaming, O(N) scalars.

A chunk is a dict of arrays for n samples: ``label`` (n,), ``label_prob`` (n,), ``topk_idx`` (n, K),
``topk_prob`` (n, K). ``decide`` makes two streaming passes over the chunks (per-class thresholds,
then flags and the confident joint) and keeps only label, label_prob and a reason code per sample --
the pruning rules also ``OTHERS_KEPT`` (class, probability) pairs, 30 bytes -- so 14 million samples
decide in under 2 GB (tools/bench_filter.py --rule all).

Rules:
* ``topk:N`` — flag when the given label is not among the scorer's N most probable classes.
* ``confident`` — confident learning on top-K data: threshold t_c = mean label_prob of the samples
  labelled c; flag when label_prob < t_label and some other class j in the top-K has prob >= t_j.
* ``both`` — flag when both rules flag.
* ``noise-rate`` / ``by-class`` / ``both-prune`` — cleanlab's pruning (``find_label_issues`` with
  ``filter_by="prune_by_noise_rate"`` / ``"prune_by_class"`` / ``"both"``) on top-K data: the confident
  joint (given class x guessed true class) is counted sparsely, calibrated and turned into a number of
  errors per (given, true) pair as cleanlab does (``JointCounter``, ``calibrate``, ``prune_counts``); then
  ``noise-rate`` removes, in each off-diagonal pair (k, j), that many samples labelled k of largest
  margin p[j] - p[k], ``by-class`` removes n_k - (kept count) samples of lowest p[k] in class k, and
  ``both-prune`` flags what both flag. As in cleanlab, a sample whose given label is the scorer's
  argmax is never flagged.
  Top-K: p of a class outside a sample's top-K is unknown; it is at most the K-th probability and at
  most 1 - sum(top-K) (``outside_bound``). Such a class is never counted as confident (exact whenever
  the bound is below its threshold). The pruning keeps per sample only the ``others`` most probable
  classes other than the label (``OTHERS_KEPT``). For a pair (k, j) a sample labelled k that carries
  j has its exact margin; one that does not has p[j] in [0, u] (u: its last kept other's probability,
  which bounds every class beyond them) and is ranked with p[j] = u / 2 (``UNKNOWN_SHARE``), the two
  rankings merged; with every class kept (others = K = C) this is cleanlab's result exactly.
Guards: per class, at most ``max_drop_frac`` of its samples are dropped and at least
``min_per_class`` are kept; the least suspicious flagged samples (highest label_prob) are kept first.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

KEEP, TOPK, CONFIDENT, BOTH, GUARD, NOISE_RATE, BY_CLASS, BOTH_PRUNE = range(8)
REASONS = {KEEP: "", TOPK: "label outside the scorer's top-{n}", CONFIDENT: "confident learning: another class is confident",
           BOTH: "outside top-{n} and another class is confident", GUARD: "flagged, kept by the per-class guard",
           NOISE_RATE: "pruned by noise rate: large margin of a likely true class",
           BY_CLASS: "pruned by class: low probability of the given label",
           BOTH_PRUNE: "pruned by noise rate and by class"}
PRUNE_KINDS = {"noise-rate": NOISE_RATE, "by-class": BY_CLASS, "both-prune": BOTH_PRUNE}
RULE_NAMES = "topk:N, confident, both[:N], noise-rate, by-class or both-prune"
EPS = 1e-6                 # cleanlab's FLOATING_POINT_COMPARISON
THRESHOLD_FLOOR = 2e-6     # cleanlab's CONFIDENT_THRESHOLDS_LOWER_BOUND
UNKNOWN_SHARE = 0.5        # p[j] of a class j beyond the kept others: estimated as this share of its bound
OTHERS_KEPT = 5            # other classes kept per sample by the pruning rules (6 bytes each at C < 65,536)


@dataclass(frozen=True)
class Rule:
    kind: str            # topk | confident | both | noise-rate | by-class | both-prune
    n: int = 0

    @property
    def prunes(self) -> bool:
        return self.kind in PRUNE_KINDS

    @classmethod
    def parse(cls, text: str, k: int) -> "Rule":
        text = text.strip()
        if text == "confident" or text in PRUNE_KINDS:
            return cls(text)
        kind, _, num = text.partition(":")
        if kind in ("topk", "both"):
            try:
                n = int(num) if num else 5
            except ValueError:
                raise ValueError(f"bad rule {text!r}: N in topk:N must be an integer") from None
            if not 1 <= n <= k:
                raise ValueError(f"rule {text!r}: N must be between 1 and --topk ({k})")
            return cls(kind, n)
        raise ValueError(f"unknown rule {text!r} ({RULE_NAMES})")

    def reason(self, code: int) -> str:
        return REASONS[code].format(n=self.n)


@dataclass
class Decision:
    rule: Rule
    label: np.ndarray         # (N,) int32
    label_prob: np.ndarray    # (N,) float32
    code: np.ndarray          # (N,) uint8 reason code (KEEP/GUARD keep the sample)
    thresholds: np.ndarray    # (C,) float32, NaN for classes with no samples
    joint: "SparseJoint | None" = None   # calibrated confident joint (given x true), every rule

    @property
    def keep(self) -> np.ndarray:
        return (self.code == KEEP) | (self.code == GUARD)


def label_rank(label: np.ndarray, topk_idx: np.ndarray) -> np.ndarray:
    """1-based rank of the label in the top-K list; K+1 when it is not there."""
    k = topk_idx.shape[1]
    hit = topk_idx == label[:, None]
    return np.where(hit.any(1), hit.argmax(1) + 1, k + 1).astype(np.int32)


def margin(label: np.ndarray, label_prob: np.ndarray, topk_idx: np.ndarray, topk_prob: np.ndarray) -> np.ndarray:
    """label_prob minus the largest probability of another class (negative: another class wins)."""
    other = np.where(topk_idx == label[:, None], -np.inf, topk_prob).max(1)
    return (label_prob - other).astype(np.float32)


def class_thresholds(chunks: Iterable[dict], num_classes: int) -> np.ndarray:
    total = np.zeros(num_classes, np.float64)
    count = np.zeros(num_classes, np.int64)
    for c in chunks:
        lab = c["label"].astype(np.int64)
        total += np.bincount(lab, weights=c["label_prob"].astype(np.float64), minlength=num_classes)
        count += np.bincount(lab, minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan).astype(np.float32)


def flag_chunk(rule: Rule, chunk: dict, thresholds: np.ndarray) -> np.ndarray:
    label, lp = chunk["label"].astype(np.int64), chunk["label_prob"]
    idx, prob = chunk["topk_idx"].astype(np.int64), chunk["topk_prob"].astype(np.float32)
    code = np.zeros(len(label), np.uint8)
    topk_flag = conf_flag = None
    if rule.kind in ("topk", "both"):
        topk_flag = ~(idx[:, :rule.n] == label[:, None]).any(1)
    if rule.kind in ("confident", "both"):
        thr = np.nan_to_num(thresholds, nan=np.inf)
        other_confident = ((prob >= thr[idx]) & (idx != label[:, None])).any(1)
        conf_flag = (lp < thr[label]) & other_confident
    if rule.kind == "topk":
        code[topk_flag] = TOPK
    elif rule.kind == "confident":
        code[conf_flag] = CONFIDENT
    else:
        code[topk_flag & conf_flag] = BOTH
    return code


def apply_guards(label: np.ndarray, label_prob: np.ndarray, code: np.ndarray, num_classes: int,
                 max_drop_frac: float, min_per_class: int) -> np.ndarray:
    """Turn the least suspicious flags of over-dropped classes into GUARD (kept). Returns new codes."""
    code = code.copy()
    flagged = np.flatnonzero((code != KEEP) & (code != GUARD))
    if not len(flagged):
        return code
    n_c = np.bincount(label, minlength=num_classes)
    f_c = np.bincount(label[flagged], minlength=num_classes)
    allowed = np.minimum(np.floor(max_drop_frac * n_c).astype(np.int64), np.maximum(n_c - min_per_class, 0))
    excess = np.maximum(f_c - allowed, 0)
    if not excess.any():
        return code
    lab = label[flagged]
    order = np.lexsort((-label_prob[flagged], lab))          # by class, most probable label first
    sorted_lab = lab[order]
    starts = np.searchsorted(sorted_lab, np.arange(num_classes))
    rank = np.arange(len(order)) - starts[sorted_lab]
    code[flagged[order[rank < excess[sorted_lab]]]] = GUARD
    return code


# ----------------------------------------------------------------------------- confident joint (sparse)

@dataclass
class SparseJoint:
    """A C x C count matrix, rows = given label, columns = (guessed) true label: the diagonal dense,
    the off-diagonal as (row, col, count) triples sorted by row * C + col, zero counts left out."""
    num_classes: int
    diag: np.ndarray      # (C,)
    rows: np.ndarray      # (M,) int64
    cols: np.ndarray      # (M,) int64
    counts: np.ndarray    # (M,)

    @property
    def keys(self) -> np.ndarray:
        return self.rows * self.num_classes + self.cols

    def row_sums(self) -> np.ndarray:
        return self.diag + np.bincount(self.rows, self.counts, self.num_classes).astype(self.diag.dtype)

    def to_dense(self) -> np.ndarray:
        """For tests and small C only."""
        m = np.diag(self.diag).astype(np.result_type(self.diag, self.counts))
        m[self.rows, self.cols] = self.counts
        return m

    def largest(self, n: int) -> list[tuple[int, int, int]]:
        """The n largest off-diagonal entries as (given, true, count), largest first."""
        top = np.lexsort((self.keys, -self.counts))[:n]
        return [(int(self.rows[i]), int(self.cols[i]), int(self.counts[i])) for i in top]


def _sparse(num_classes: int, diag, keys, counts) -> SparseJoint:
    counts = np.asarray(counts)
    dtype = np.int64 if counts.dtype.kind in "iub" else np.float64
    keys, inv = np.unique(np.asarray(keys, np.int64), return_inverse=True)
    counts = np.bincount(inv.reshape(-1), counts.astype(np.float64), len(keys)).astype(dtype)
    nz = counts != 0
    keys, counts = keys[nz], counts[nz]
    return SparseJoint(num_classes, diag, keys // num_classes, keys % num_classes, counts)


def outside_bound(topk_prob: np.ndarray) -> np.ndarray:
    """Upper bound on the probability of any class outside a sample's top-K: min(p_K, 1 - sum)."""
    return np.clip(np.minimum(topk_prob[:, -1], 1.0 - topk_prob.sum(1)), 0.0, None).astype(np.float32)


def confident_guess(chunk: dict, thresholds: np.ndarray) -> np.ndarray:
    """cleanlab's true-label guess per sample (-1: no class confident). A class is confident when
    p >= t - 1e-6; several confident -> the argmax (the top-1), one -> that class. Classes outside the
    top-K count as not confident; the given label's probability is always known (label_prob)."""
    label, lp = chunk["label"].astype(np.int64), chunk["label_prob"].astype(np.float32)
    idx, prob = chunk["topk_idx"].astype(np.int64), chunk["topk_prob"].astype(np.float32)
    thr = np.maximum(np.nan_to_num(thresholds.astype(np.float32), nan=np.inf), THRESHOLD_FLOOR) - EPS
    conf = prob >= thr[idx]
    label_out = ~(idx == label[:, None]).any(1)
    label_conf = label_out & (lp >= thr[label])          # a confident label outside the top-K
    n_conf = conf.sum(1) + label_conf
    only = np.where(conf.any(1), idx[np.arange(len(idx)), conf.argmax(1)], label)
    return np.where(n_conf > 1, idx[:, 0], np.where(n_conf == 1, only, -1))


def calibrate(joint: SparseJoint, label_counts: np.ndarray) -> SparseJoint:
    """cleanlab's ``calibrate_confident_joint``: rows rescaled to the given-label counts, the whole
    normalised to their total, then rounded to integers preserving each row's total."""
    n = label_counts.astype(np.float64)
    rs = np.maximum(joint.row_sums().astype(np.float64), 1e-100)
    diag = joint.diag / rs * n                       # cleanlab's order of operations, for equal rounding
    off = joint.counts / rs[joint.rows] * n[joint.rows]
    total = max(diag.sum() + off.sum(), 1e-100)
    diag, off = diag / total * n.sum(), off / total * n.sum()
    diag_i, off_i = _round_rows(joint.num_classes, diag, joint.rows, joint.cols, off)
    return _sparse(joint.num_classes, diag_i, joint.keys, off_i)


def _round_rows(num_classes: int, diag: np.ndarray, rows: np.ndarray, cols: np.ndarray, off: np.ndarray):
    """cleanlab's ``round_preserving_row_totals`` on a sparse matrix (zeros stay zero)."""
    r = np.concatenate([np.arange(num_classes), rows])
    col = np.concatenate([np.arange(num_classes), cols])
    v = np.concatenate([diag, off])
    ints = np.round(v)
    want = np.round(np.bincount(r, v, num_classes))
    diff = (want - np.bincount(r, ints, num_classes)).astype(np.int64)
    step = np.sign(diff)[r]
    # per row the entries to move first: largest residual when rounding up (ties: last column first,
    # as cleanlab's reversed argsort), smallest when rounding down (ties: first column first). Residuals
    # equal to 1e-9 are ties: cleanlab breaks those by the last bits of its dense float sums.
    order = np.lexsort((-col * step, np.round(-(v - ints) * step, 9), r))
    rank = _rank_in_groups(r[order], num_classes)
    move = order[rank < np.abs(diff)[r[order]]]
    ints[move] += step[move]
    ints = ints.astype(np.int64)
    return ints[:num_classes], ints[num_classes:]


def _rank_in_groups(sorted_groups: np.ndarray, num_groups: int) -> np.ndarray:
    """0-based position of each element within its group (``sorted_groups`` sorted); int32 when it fits."""
    dt = np.int32 if len(sorted_groups) < 2 ** 31 else np.int64
    rank = np.arange(len(sorted_groups), dtype=dt)
    rank -= np.searchsorted(sorted_groups, np.arange(num_groups)).astype(dt)[sorted_groups]
    return rank


def _group_order(group: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Indices sorting by group, then by float32 value ascending: one argsort of a uint64 key
    (group << 32 | the value's order-preserving bits), lighter than np.lexsort at 14M samples."""
    bits = np.ascontiguousarray(value, np.float32).view(np.uint32)
    key = group.astype(np.uint64) << np.uint64(32)
    key |= bits ^ np.where(bits >> 31, np.uint32(0xFFFFFFFF), np.uint32(0x80000000))
    return np.argsort(key)


def prune_counts(cal: SparseJoint, min_examples: int = 1) -> SparseJoint:
    """cleanlab's ``_keep_at_least_n_per_class`` (frac_noise 1), same orientation as the joint: entry
    (k, j) is how many samples labelled k with true class j to remove, diag[k] how many of k to keep."""
    c = cal.num_classes
    new_diag = np.maximum(cal.diag, min_examples)
    raised = new_diag - cal.diag
    nnz = np.bincount(cal.rows, minlength=c) + (cal.diag != 0)
    per = raised / np.maximum(nnz - 1.0, 1.0)
    off = np.maximum(cal.counts - per[cal.rows], 0).astype(np.int64)     # cleanlab truncates to int
    return _sparse(c, new_diag.astype(np.int64), cal.keys, off)


# ----------------------------------------------------------------------------- pruning

@dataclass
class PruneState:
    """Per sample: the ``others`` most probable classes other than the given label (from the top-K;
    a missing one is id C with the outside-top-K bound as probability)."""
    other_idx: np.ndarray     # (N, m) uint16 (int32 when C >= 65,535)
    other_prob: np.ndarray    # (N, m) float32


def others(chunk: dict, m: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The m most probable classes other than the label (uint16 ids when C < 65,536); a missing one
    (top-K shorter than m + 1) is id C with the outside-top-K bound as its probability."""
    label = chunk["label"].astype(np.int64)
    idx, prob = chunk["topk_idx"].astype(np.int64), chunk["topk_prob"].astype(np.float32)
    n = len(label)
    idx = np.concatenate([idx, np.full((n, 1), num_classes)], 1)
    prob = np.concatenate([prob, outside_bound(prob)[:, None]], 1)
    order = np.argsort(idx == label[:, None], axis=1, kind="stable")[:, :m]   # the label moves last
    dtype = np.uint16 if num_classes < 65535 else np.int32
    return (np.take_along_axis(idx, order, 1).astype(dtype), np.take_along_axis(prob, order, 1))


def _by_class(label, label_prob, to_remove, counts, min_examples) -> np.ndarray:
    """Per class k, the to_remove[k] samples of lowest label_prob (classes of <= min_examples: none)."""
    c = len(counts)
    quota = np.where(counts > min_examples, np.maximum(to_remove, 0), 0).astype(np.int64)
    order = _group_order(label, label_prob)
    lab = label[order]
    sel = _rank_in_groups(lab, c) < quota[lab]
    del lab
    flag = np.zeros(len(label), bool)
    flag[order[sel]] = True
    return flag


def _by_noise_rate(label, label_prob, st: PruneState, pc: SparseJoint, counts, min_examples,
                   block: int = 1 << 20) -> np.ndarray:
    """Per off-diagonal pair (k, j) of ``pc``, the pc[k, j] samples labelled k of largest p[j] - p[k]."""
    c, n = pc.num_classes, len(label)
    keys, need = pc.keys, pc.counts.astype(np.int64)
    if not len(keys):
        return np.zeros(n, bool)
    ok = counts > min_examples
    sample, pair, marg = [], [], []
    for s in range(0, n, block):            # candidates: (sample, pair) where j is one of its others
        lab, lp = label[s:s + block].astype(np.int64), label_prob[s:s + block]
        for r in range(st.other_idx.shape[1]):
            j = st.other_idx[s:s + block, r].astype(np.int64)
            key = lab * c + j
            pos = np.minimum(np.searchsorted(keys, key), len(keys) - 1)
            hit = np.flatnonzero((keys[pos] == key) & (j < c) & ok[lab])
            sample.append(hit + s)
            pair.append(pos[hit])
            marg.append(st.other_prob[s:s + block, r][hit] - lp[hit])
    sample, pair, marg = np.concatenate(sample), np.concatenate(pair), np.concatenate(marg)
    order = _group_order(pair, -marg)
    sample, pair, marg = sample[order], pair[order], marg[order]
    del order
    cstart = np.searchsorted(pair, np.arange(len(keys)))
    ccount = np.bincount(pair, minlength=len(keys))
    # every sample of class k, ranked by an estimate of p[j] - p[k] for a j it does not carry
    neg = label_prob - np.float32(UNKNOWN_SHARE) * st.other_prob[:, -1]       # minus the estimate
    lorder = _group_order(label, neg)
    lest = neg[lorder]
    del neg
    np.negative(lest, out=lest)
    lcount = counts.astype(np.int64)
    lstart = np.concatenate([[0], np.cumsum(lcount)[:-1]])
    k = pc.rows
    need = np.minimum(need, ccount + lcount[k])
    # a = how many of pair's top-`need` are its candidates: the top-`need` of the two merged rankings
    lo, hi = np.maximum(0, need - lcount[k]), np.minimum(need, ccount)
    while True:
        todo = lo < hi
        if not todo.any():
            break
        mid = (lo + hi) // 2
        more = np.zeros(len(keys), bool)
        t = np.flatnonzero(todo)
        cm = marg[np.minimum(cstart[t] + mid[t], len(marg) - 1)]
        le = lest[np.clip(lstart[k[t]] + need[t] - mid[t] - 1, 0, max(len(lest) - 1, 0))]
        more[t] = cm >= le
        lo = np.where(todo & more, mid + 1, lo)
        hi = np.where(todo & ~more, mid, hi)
    take = lo
    flag = np.zeros(n, bool)
    flag[sample[_rank_in_groups(pair, len(keys)) < take[pair]]] = True
    del lest, sample, marg
    fill = np.zeros(c, np.int64)
    np.maximum.at(fill, k, need - take)           # the same ranking of class k serves every pair
    if fill.any():
        lab = label[lorder]
        sel = _rank_in_groups(lab, c) < fill[lab]
        sel &= ok[lab]
        del lab
        flag[lorder[sel]] = True
    return flag


def prune(rule: Rule, label, label_prob, st: PruneState, pc: SparseJoint, min_examples: int = 1) -> np.ndarray:
    """Reason codes of a pruning rule (cleanlab's find_label_issues for one filter_by)."""
    counts = np.bincount(label, minlength=pc.num_classes)
    flag = np.ones(len(label), bool)
    if rule.kind in ("by-class", "both-prune"):
        flag &= _by_class(label, label_prob, counts - pc.diag, counts, min_examples)
    if rule.kind in ("noise-rate", "both-prune"):
        flag &= _by_noise_rate(label, label_prob, st, pc, counts, min_examples)
    flag &= ~(label_prob + EPS >= st.other_prob[:, 0])        # the given label is the argmax
    return np.where(flag, PRUNE_KINDS[rule.kind], KEEP).astype(np.uint8)


def _stack(parts: list) -> np.ndarray:
    """np.concatenate that frees each part once copied (peak: the result plus one part)."""
    out = np.empty((sum(len(x) for x in parts),) + parts[0].shape[1:], parts[0].dtype)
    s = 0
    while parts:
        x = parts.pop(0)
        out[s:s + len(x)] = x
        s += len(x)
    return out


class JointCounter:
    """cleanlab's (uncalibrated) confident joint, counted chunk by chunk: a dense diagonal and the
    off-diagonal (given, guess) pairs that occur, merged every 16 chunks."""

    def __init__(self, num_classes: int, thresholds: np.ndarray):
        self.c, self.thresholds = num_classes, thresholds
        self.diag = np.zeros(num_classes, np.int64)
        self.keys: list[np.ndarray] = []
        self.counts: list[np.ndarray] = []

    def add(self, chunk: dict) -> None:
        lab = chunk["label"].astype(np.int64)
        guess = confident_guess(chunk, self.thresholds)
        self.diag += np.bincount(lab[guess == lab], minlength=self.c)
        off = (guess >= 0) & (guess != lab)
        u, cnt = np.unique(lab[off] * self.c + guess[off], return_counts=True)
        self.keys.append(u)
        self.counts.append(cnt)
        if len(self.keys) >= 16:
            j = self._merged()
            self.keys, self.counts = [j.keys], [j.counts]

    def _merged(self) -> SparseJoint:
        return _sparse(self.c, self.diag, np.concatenate(self.keys or [np.zeros(0, np.int64)]),
                       np.concatenate(self.counts or [np.zeros(0, np.int64)]))

    def joint(self) -> SparseJoint:
        """As cleanlab's compute_confident_joint(calibrate=False): the diagonal clipped to >= 1."""
        j = self._merged()
        j.diag = np.maximum(j.diag, 1)
        return j


# ----------------------------------------------------------------------------- the two passes

def decide(chunks: Callable[[], Iterable[dict]], num_classes: int, rule: Rule, max_drop_frac: float = 1.0,
           min_per_class: int = 0, others_kept: int = OTHERS_KEPT) -> Decision:
    """Two streaming passes over ``chunks()`` (a callable returning a fresh iterator each time): class
    thresholds, then per sample label, label_prob, a reason code (and for the pruning rules the
    ``others_kept`` most probable other classes) while the confident joint is counted sparsely."""
    thresholds = class_thresholds(chunks(), num_classes)
    labels, probs, codes, o_idx, o_prob = [], [], [], [], []
    counter = JointCounter(num_classes, thresholds)
    for c in chunks():
        labels.append(c["label"].astype(np.int32))
        probs.append(c["label_prob"].astype(np.float32))
        counter.add(c)
        if rule.prunes:            # by-class needs only the largest other probability (argmax check)
            i, p = others(c, others_kept if rule.kind != "by-class" else 1, num_classes)
            o_idx.append(i)
            o_prob.append(p)
        else:
            codes.append(flag_chunk(rule, c, thresholds))
    label = np.concatenate(labels) if labels else np.zeros(0, np.int32)
    label_prob = np.concatenate(probs) if probs else np.zeros(0, np.float32)
    raw = counter.joint()
    cal = calibrate(raw, np.bincount(label, minlength=num_classes))
    if rule.prunes and len(label):
        st = PruneState(_stack(o_idx), _stack(o_prob))
        code = prune(rule, label, label_prob, st, prune_counts(cal))
        del st
    else:
        code = np.concatenate(codes) if codes else np.zeros(0, np.uint8)
    code = apply_guards(label, label_prob, code, num_classes, max_drop_frac, min_per_class)
    return Decision(rule, label, label_prob, code, thresholds, cal)
