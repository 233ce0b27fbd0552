"""`plait prep filter DATASET --output NEW`: a new dataset of the selected samples of a plait dataset, by CLIP score
(`plait prep score`), near-duplicate embeddings, image size and caption rules.

Two stages. Decide: every sample of the source gets a verdict (kept, or the reason it is not), a pure function of
the source's manifest, the score files and the options; the verdicts are saved once (`_filter_decisions.parquet`),
so a resumed run does not decide again. Copy: each source shard becomes the output shard of the same number,
holding its kept samples' members copied byte for byte (no refetch, no re-encode) with plait's deterministic tar
headers, written like prep writes shards (tar, member index, records, stats last as the done marker, each file
atomically); a rerun skips the finished shards. Then sizes.json, manifest.json and samples.parquet as `merge`
writes them, so the new dataset passes `plait prep verify` and trains with `plait train`.

Rules, in the order they are applied (the first that fails is the recorded reason):
  image too small        the stored image's shorter side is below --min-image-size
  image rule R           an --image-rule fails (min-side=N, max-side=N, min-pixels=N, max-aspect=R), judged on the
                         size in the records (rules.py), never by decoding
  caption rule R         a --caption-rule fails (min-words=N, max-words=N, min-chars=N, max-chars=N, exclude=REGEX)
  caption language L     the caption's language (lang=CODE[,CODE...], lang-min-prob=P; py3langid, offline)
  (--basic-filter datacomp adds DataComp's basic filter: min-words=3, min-chars=6, lang=en, min-side=200,
  max-aspect=3)
  contaminated           near-duplicate of an image of a --decontaminate evaluation set, by pHash or embedding
                         (decontaminate.py; the set and its sample are named)
  not scored             the score file has null for the sample (it could not be decoded; the reason follows)
  score below threshold  score < --min-score
  score not in top fraction   outside the best --top-fraction of all scored samples
  near-duplicate         image embedding cosine >= --dedup-embeddings to a kept sample of higher score (named)
`_plan.json` keeps the source's plan plus `filter`: the source, its fingerprint, the score folder, the model and
every threshold; a rerun with other settings into the same output is refused.
"""
from __future__ import annotations

import io
import math
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_prep.shards import manifest, remote
from pipeline.options import option
from data_prep.curate.score_set import PLAN as SCORE_PLAN
from data_prep.curate.score_set import open_dataset
from data_prep.curate.decontaminate import check_thresholds
from data_prep.curate.rules import (BASIC_FILTERS, caption_verdict, image_size, image_verdict, parse_caption_rules,
                                    parse_image_rules)
from data_prep.shards.members import CAPTION_KEYS, MemberKeys, split_name
from data_prep.shards.tarwalk import TarFormatError, iter_members, iter_samples
from data_prep.shards.writer import END_OF_ARCHIVE, HashingWriter, OutputDir, reason_kind, tar_header

DECISIONS = "_filter_decisions.parquet"


@dataclass(frozen=True)
class FilterOptions:
    dataset: str = option(no_flag=True)
    """source: a plait dataset folder (manifest.json, per-sample records)"""
    output: str = option(metavar="NEW")
    """folder of the new dataset"""
    scores: str | None = option(None, metavar="DIR")
    """score folder of `plait prep score` (default: DATASET/scores); needed by the score and dedup rules"""
    min_score: float | None = option(None, metavar="S")
    """keep samples whose image-text cosine is at least S (-1..1)"""
    top_fraction: float | None = option(None, metavar="F")
    """keep the best-scored fraction F (0..1] of the scored samples"""
    dedup_embeddings: float | None = option(None, metavar="THRESH")
    """drop samples whose image embedding has cosine >= THRESH (0..1] to a kept, better-scored one (needs
    `plait prep score --embeddings`)"""
    dedup_method: str = option("auto", choices=("auto", "exact", "clustered"))
    """near-duplicate search: exact (every candidate against every kept sample; quadratic), clustered (k-means
    units, data_prep/curate/clusters.py), or auto: exact below 20,000 candidates"""
    dedup_clusters: int | None = option(None, metavar="K")
    """clustered search: k-means clusters (default sqrt(probe x candidates))"""
    dedup_probe: int = option(3, metavar="P")
    """clustered search: a sample is compared in its P nearest clusters (>= 2 finds pairs on a boundary)"""
    dedup_work: str | None = option(None, metavar="DIR")
    """clustered search: a local work folder for its embeddings, units and verdicts (default NEW/_dedup)"""
    dedup_processes: int = option(1, metavar="N")
    """clustered search: local processes running its units"""
    dedup_units: str = option("local", choices=("local", "array"))
    """clustered search: run its units here (local), or prepare them and stop until a job array ran them
    (array: `plait launch dedup` renders prepare, array and this command again)"""
    min_image_size: int = 0
    """drop samples whose stored image's shorter side is smaller (pixels)"""
    caption_rules: tuple[str, ...] = option((), repeat=True, aliases=("--caption-rule",), metavar="RULE")
    """caption rule, repeatable: min-words=N, max-words=N, min-chars=N, max-chars=N, exclude=REGEX
    (case-insensitive search), lang=CODE[,CODE...] (the caption's language by py3langid, ISO 639 codes) with
    lang-min-prob=P (its probability at least P, 0..1)"""
    image_rules: tuple[str, ...] = option((), repeat=True, aliases=("--image-rule",), metavar="RULE")
    """image rule, repeatable, on the original image size in the records: min-side=N, max-side=N (pixels of
    the shorter / longer side), min-pixels=N, max-aspect=R (longer / shorter side)"""
    basic_filter: str | None = option(None, choices=tuple(BASIC_FILTERS))
    """a named bundle of caption and image rules, applied before --caption-rule / --image-rule: datacomp =
    DataComp's basic filter (Gadre et al. 2023: English, > 2 words, > 5 characters, shorter side >= 200 px,
    aspect ratio <= 3)"""
    caption_keys: str = option(CAPTION_KEYS, metavar="KEYS")
    """caption members the caption rules read, tried in order: extensions or json:FIELD (as training's
    data.caption_keys); a sample without one fails every rule, with the reason"""
    decontaminate: tuple[str, ...] = option((), repeat=True, metavar="EVAL")
    """evaluation set, repeatable: a plait dataset folder or WebDataset shards (as `plait prep score` opens
    them); every sample whose image is a near-duplicate of one of its images is dropped, the reason naming it"""
    decontaminate_cosine: float = option(0.95, metavar="C")
    """with --decontaminate: near-duplicate when the image embeddings (the score folder's, under its model)
    have cosine >= C (0..1; 0: embeddings not used; needs `plait prep score --embeddings`)"""
    decontaminate_hamming: int = option(8, metavar="BITS")
    """with --decontaminate: near-duplicate when the images' 64-bit pHashes differ in <= BITS bits (0..64;
    -1: pHash not used)"""
    device: str = option("cpu", choices=("cpu", "cuda"))
    """where the near-duplicate search runs"""
    progress: bool = True
    """progress bar"""

    def __post_init__(self) -> None:
        MemberKeys.parse(caption_keys=self.caption_keys, names=("--image-keys", "--caption-keys"))
        if self.min_score is not None and self.top_fraction is not None:
            raise ValueError("--min-score and --top-fraction: give one of them")
        if self.min_score is not None and not -1.0 <= self.min_score <= 1.0:
            raise ValueError(f"--min-score {self.min_score}: a cosine similarity threshold must be in [-1, 1]")
        if self.top_fraction is not None and not 0.0 < self.top_fraction <= 1.0:
            raise ValueError(f"--top-fraction {self.top_fraction}: must be in (0, 1]")
        if self.dedup_embeddings is not None and not 0.0 < self.dedup_embeddings <= 1.0:
            raise ValueError(f"--dedup-embeddings {self.dedup_embeddings}: a cosine threshold must be in (0, 1]")
        for flag, value, choices in (("--dedup-method", self.dedup_method, ("auto", "exact", "clustered")),
                                     ("--dedup-units", self.dedup_units, ("local", "array"))):
            if value not in choices:
                raise ValueError(f"{flag} {value!r}: expected one of {', '.join(choices)}")
        for flag, value in (("--dedup-clusters", self.dedup_clusters), ("--dedup-probe", self.dedup_probe),
                            ("--dedup-processes", self.dedup_processes)):
            if value is not None and value < 1:
                raise ValueError(f"{flag} {value}: must be >= 1")
        if self.min_image_size < 0:
            raise ValueError(f"--min-image-size {self.min_image_size}: must be >= 0")
        if self.basic_filter is not None and self.basic_filter not in BASIC_FILTERS:
            raise ValueError(f"--basic-filter {self.basic_filter!r}: expected one of {', '.join(BASIC_FILTERS)}")
        parse_caption_rules(self.all_caption_rules)
        parse_image_rules(self.all_image_rules)
        check_thresholds(self.decontaminate, self.decontaminate_cosine, self.decontaminate_hamming)

    @property
    def scores_folder(self) -> str | None:
        """The score folder the score and dedup rules read (--scores, else DATASET/scores); None without them."""
        return (self.scores or f"{self.dataset.rstrip('/')}/scores") if self.needs_scores else None

    @property
    def all_caption_rules(self) -> tuple[str, ...]:
        """--basic-filter's caption rules, then --caption-rule's."""
        bundle = BASIC_FILTERS[self.basic_filter].caption_rules if self.basic_filter in BASIC_FILTERS else ()
        return (*bundle, *(self.caption_rules or ()))

    @property
    def all_image_rules(self) -> tuple[str, ...]:
        bundle = BASIC_FILTERS[self.basic_filter].image_rules if self.basic_filter in BASIC_FILTERS else ()
        return (*bundle, *(self.image_rules or ()))  # None: the CLI's repeatable flag, not given

    @property
    def needs_scores(self) -> bool:
        return self.has_score_rules or self.decontaminate_embeddings

    @property
    def has_score_rules(self) -> bool:
        return self.min_score is not None or self.top_fraction is not None or self.dedup_embeddings is not None

    @property
    def decontaminate_embeddings(self) -> bool:
        """Whether decontamination compares embeddings (then it reads the score folder's)."""
        return bool(self.decontaminate) and self.decontaminate_cosine > 0

    @property
    def needs_embeddings(self) -> bool:
        return self.dedup_embeddings is not None or self.decontaminate_embeddings


# ------------------------------------------------------------------------------------------------ deciding
def load_pool(src: OutputDir, shards: list[str]) -> pa.Table:
    """The source's samples (ok records), shard by shard in key order, with `pos` = their ordinal."""
    tables = []
    for name in shards:
        t = manifest.read_records(src, f"{name.removesuffix('.tar')}.parquet")
        t = t.filter(pc.equal(t.column("status"), "ok"))
        if len(t) and max(t.column("num_samples").to_pylist()) > 1:
            raise ValueError(f"{src.url!r}: {name} holds per-frame samples (several tar samples per record); "
                             "filter works on one sample per record")
        tables.append(t.sort_by("key"))
    return pa.concat_tables(tables) if tables else pa.Table.from_pylist([], manifest.RECORD_SCHEMA)


def load_scores(opts: FilterOptions, dataset, keys: list[str]) -> tuple[dict, np.ndarray, list, np.ndarray | None]:
    """(score plan, scores [N] with NaN for null, null reasons [N], image embeddings [N, D] or None) aligned to
    `keys`; refuses scores of another dataset, unfinished score folders and missing embeddings."""
    folder = opts.scores_folder
    remote.trust(folder)  # typed with --scores, or the dataset's own score folder
    fs, root = fsspec.core.url_to_fs(folder)
    if not fs.exists(f"{root.rstrip('/')}/{SCORE_PLAN}"):
        raise FileNotFoundError(f"--scores {folder!r}: no score folder ({SCORE_PLAN} missing); run "
                                f"`plait prep score {opts.dataset} --model EXPORT` first")
    sdir = OutputDir(folder)
    plan = _score_plan(sdir, folder)
    if plan.get("dataset_fingerprint") != dataset.fingerprint:
        raise ValueError(f"--scores {folder!r} were computed on {plan.get('dataset')!r} (fingerprint "
                         f"{str(plan.get('dataset_fingerprint'))[:12]}), not on {opts.dataset!r} (fingerprint "
                         f"{dataset.fingerprint[:12]}): score this dataset first")
    missing = [s for s in dataset.shards if not sdir.exists(f"{s.removesuffix('.tar')}_stats.json")]
    if missing:
        raise ValueError(f"--scores {folder!r}: shards not scored yet: {', '.join(missing[:10])}"
                         f"{' ...' if len(missing) > 10 else ''} (rerun `plait prep score` to finish)")
    if opts.needs_embeddings and not plan.get("embeddings"):
        flag = "--dedup-embeddings" if opts.dedup_embeddings is not None else "--decontaminate (its embedding test)"
        raise ValueError(f"{flag} needs image embeddings, and {folder!r} has none: rerun "
                         "`plait prep score ... --embeddings` into a new --out")
    where = {k: i for i, k in enumerate(keys)}
    scores = np.full(len(keys), np.nan, np.float32)
    reasons: list[str | None] = ["not in the score file"] * len(keys)
    emb = None
    cols = ["key", "score", "reason"] + (["image_embedding"] if opts.needs_embeddings else [])
    seen = np.zeros(len(keys), bool)
    for s in dataset.shards:
        name = sdir.path(f"{s.removesuffix('.tar')}.parquet")
        try:
            with sdir.fs.open(name, "rb") as f:
                t = manifest.read_parquet(f, cols)
        except (OSError, ValueError, KeyError) as exn:  # pyarrow's errors are of these kinds (missing column too)
            raise ValueError(f"--scores {folder!r}: {name} is not a score file ({type(exn).__name__}: "
                             f"{str(exn).splitlines()[0] if str(exn) else ''})") from None
        absent = [c for c in cols if c not in t.column_names]
        if absent:
            raise ValueError(f"--scores {folder!r}: {name} has no {absent[0]!r} column (not written by plait "
                             "prep score)")
        idx = np.array([where.get(k, -1) for k in t.column("key").to_pylist()], np.int64)
        if (idx < 0).any():
            raise ValueError(f"--scores {folder!r}: {s} has keys the dataset does not ({int((idx < 0).sum())}): "
                             "scores of another dataset")
        if len(np.unique(idx)) < len(idx) or seen[idx].any():
            raise ValueError(f"--scores {folder!r}: {name} scores a sample twice")
        seen[idx] = True
        if not pa.types.is_floating(t.schema.field("score").type):
            raise ValueError(f"--scores {folder!r}: {name}: the score column is {t.schema.field('score').type}, "
                             "not a float (not written by plait prep score)")
        sc = t.column("score").to_numpy(zero_copy_only=False).astype(np.float32)  # null -> nan
        nulls = t.column("score").is_null().to_numpy(zero_copy_only=False)
        with np.errstate(invalid="ignore"):
            bad = ~nulls & ~(np.abs(sc) <= 1 + 1e-3)  # NaN, inf and |s| > 1 (a null score is a recorded reason)
        if bad.any():
            raise ValueError(f"--scores {folder!r}: {name} holds the score {float(sc[bad][0])!r}: a cosine "
                             "similarity lies in [-1, 1]")
        scores[idx] = sc
        for i, r in zip(idx, t.column("reason").to_pylist()):
            reasons[i] = r
        if emb is None and "image_embedding" in cols:
            emb = np.zeros((len(keys), plan["embedding_dim"]), np.float16)
        if emb is not None:
            col = t.column("image_embedding").combine_chunks()
            values = col.values.to_numpy(zero_copy_only=False)
            if len(values) != len(t) * plan["embedding_dim"]:
                raise ValueError(f"--scores {folder!r}: {name}: embeddings are not of dimension "
                                 f"{plan['embedding_dim']} (the plan's embedding_dim)")
            rows = values.reshape(len(t), -1)
            if not np.isfinite(rows[~nulls]).all():
                raise ValueError(f"--scores {folder!r}: {name} holds non-finite embeddings")
            emb[idx] = rows
    return plan, scores, reasons, emb


def _score_plan(sdir: OutputDir, folder: str) -> dict:
    """A score folder's plan, checked: an object with a sane `embedding_dim` (it sizes an allocation)."""
    plan = sdir.read_json_object(SCORE_PLAN, f"--scores {folder!r}: {SCORE_PLAN}")
    dim = plan.get("embedding_dim")
    if isinstance(dim, bool) or not isinstance(dim, int) or not 0 < dim <= 65536:
        raise ValueError(f"--scores {folder!r}: {SCORE_PLAN} has embedding_dim {dim!r} (expected 1..65536)")
    return plan


def read_captions(src: OutputDir, shards: list[str], keys: MemberKeys) -> dict[str, str | None]:
    """The caption of every sample by `keys` (the loader's rule), read with a header walk that seeks over
    every other member; a sample without a readable caption maps to None."""
    captions: dict[str, str | None] = {}
    for name in shards:
        with src.fs.open(src.path(name), "rb") as f:
            try:
                for sample in iter_samples(f, want=lambda ext: ext in keys.caption or ext == "json"):
                    try:
                        text = keys.caption_of({ext: data for ext, data in sample.members if data is not None})
                    except (KeyError, ValueError):  # no caption member, or a json without the field
                        text = None
                    captions[sample.key] = text
            except TarFormatError as exn:
                raise ValueError(f"{src.path(name)}: unreadable tar in the caption rules' pass ({exn}); "
                                 f"`plait prep verify {src.url}` names the damage") from None
    return captions


def decide(opts: FilterOptions, dataset, src: OutputDir, pool: pa.Table) -> tuple[list[str | None], dict]:
    """The reason each pool sample is not kept (None = kept), and the provenance of the decision."""
    keys = pool.column("key").to_pylist()
    n = len(keys)
    reasons: list[str | None] = [None] * n
    info: dict[str, Any] = {}
    if opts.min_image_size:
        for i, (w, h) in enumerate(zip(pool.column("width").to_pylist(), pool.column("height").to_pylist())):
            if w is not None and h is not None and min(w, h) < opts.min_image_size:
                reasons[i] = f"image too small ({w}x{h} < {opts.min_image_size})"
    if opts.all_image_rules:
        image_rules = parse_image_rules(opts.all_image_rules)
        for i, rec in enumerate(pool.select(["width", "height", "original_width", "original_height"]).to_pylist()):
            if reasons[i] is None:
                reasons[i] = image_verdict(*image_size(rec), image_rules)
    if opts.basic_filter:
        info["basic_filter"] = {"name": opts.basic_filter, "caption_rules": list(opts.all_caption_rules),
                                "image_rules": list(opts.all_image_rules),
                                "source": BASIC_FILTERS[opts.basic_filter].source}
    if opts.all_caption_rules:
        rules = parse_caption_rules(opts.all_caption_rules)
        captions = read_captions(src, dataset.shards, MemberKeys.parse(caption_keys=opts.caption_keys))
        for i, k in enumerate(keys):
            if reasons[i] is None:
                reasons[i] = caption_verdict(captions.get(k), rules)
    plan = emb = None
    if opts.needs_scores:
        plan, scores, null_reasons, emb = load_scores(opts, dataset, keys)
    if opts.decontaminate:  # before the score rules: a contaminated sample is named as such
        from data_prep.curate.decontaminate import decontaminate
        info["decontamination"] = decontaminate(opts, src, dataset.shards, keys, reasons, emb, plan)
    if opts.needs_scores and opts.has_score_rules:
        info["model"], info["scores"] = plan["model"], opts.scores_folder
        scored = ~np.isnan(scores)
        if opts.top_fraction is not None:
            count = math.ceil(opts.top_fraction * int(scored.sum()))
            # best first; ties by position, so the cut is deterministic
            ranked = np.lexsort((np.arange(n), -np.where(scored, scores, -np.inf)))
            in_top = np.zeros(n, bool)
            in_top[ranked[:count]] = True
            in_top &= scored
            cutoff = float(scores[ranked[count - 1]]) if count else math.inf
            info["top_fraction_cutoff"] = cutoff
        for i in range(n):
            if reasons[i] is not None:
                continue
            if not scored[i]:
                reasons[i] = f"not scored ({null_reasons[i]})"
            elif opts.min_score is not None and scores[i] < opts.min_score:
                reasons[i] = f"score below threshold ({scores[i]:.4f} < {opts.min_score})"
            elif opts.top_fraction is not None and not in_top[i]:
                reasons[i] = f"score not in top fraction ({scores[i]:.4f} < cutoff {cutoff:.4f})"
        if opts.dedup_embeddings is not None:
            alive = np.array([r is None for r in reasons])
            order = np.flatnonzero(alive)
            order = order[np.lexsort((order, -scores[order]))]  # best score first
            emb_f = emb  # [N, D] float16, L2-normalised when written
            from data_prep.curate.clusters import ClusterOptions
            from data_prep.curate.dedup import near_duplicates_of
            work = opts.dedup_work or (f"{opts.output.rstrip('/')}/_dedup" if "://" not in opts.output else None)
            method, dup_of, cos = near_duplicates_of(
                lambda idx: emb_f[idx], order, emb.shape[1], opts.dedup_embeddings, opts.dedup_method, work,
                ClusterOptions(num_clusters=opts.dedup_clusters, probe=opts.dedup_probe), opts.dedup_processes,
                opts.dedup_units, opts.device, opts.progress)
            info["dedup_method_used"] = method  # --dedup-method auto resolved (not a setting: a rerun compares those)
            for p in np.flatnonzero(dup_of >= 0):
                reasons[order[p]] = f"near-duplicate (of {keys[order[dup_of[p]]]}, cosine {cos[p]:.4f})"
    return reasons, info


# ------------------------------------------------------------------------------------------------ copying
def copy_shard(src: OutputDir, out: OutputDir, name: str, records: list[dict], kept: set[str]) -> dict:
    """Writes output shard `name`: the kept samples' members copied from the source tar, its index, records and
    stats (the done marker), each atomically."""
    stem = name.removesuffix(".tar")
    keys, offsets, found = [], [], set()
    with src.fs.open(src.path(name), "rb") as f, out.open_atomic(name) as raw:
        hw = HashingWriter(raw)
        want = lambda member: (s := split_name(member)) is not None and s[0] in kept
        try:
            for member, payload, size in iter_members(f, want):
                if payload is None:
                    continue
                key = split_name(member)[0]
                if key not in found:
                    found.add(key)
                    keys.append(key)
                    offsets.append(hw.size)
                hw.write(tar_header(member, size))  # the source name as written (case kept)
                hw.write(payload)
                if size % 512:
                    hw.write(bytes(512 - size % 512))
        except TarFormatError as e:
            raise ValueError(f"{src.url}/{name}: {e} (run `plait prep verify {src.url}`)") from None
        hw.write(bytes(END_OF_ARCHIVE))
    if found != kept:
        raise ValueError(f"{src.url}/{name}: samples in the manifest are missing from the tar: "
                         f"{', '.join(sorted(kept - found)[:5])} (run `plait prep verify {src.url}`)")
    out.write_json(f"{stem}.idx.json", {"format": "plait-tar-index/1", "keys": keys, "offsets": offsets,
                                        "tar_bytes": hw.size})
    manifest.write_shard_records(out, f"{stem}.parquet", records)
    reasons = Counter(reason_kind(r["reason"]) for r in records if r["status"] != "ok")
    num_ok = sum(r["status"] == "ok" for r in records)
    stats = {"format": "plait-shard/1", "shard": int(stem), "tar": name, "num_input_rows": len(records),
             "num_samples": len(keys), "num_ok": num_ok, "num_rejected": len(records) - num_ok,
             "reasons": dict(sorted(reasons.items())), "bytes": hw.size, "sha256": hw.sha.hexdigest()}
    out.write_json(f"{stem}_stats.json", stats)
    return stats


def filter_dataset(opts: FilterOptions, log=print) -> dict[str, Any]:
    started = time.monotonic()
    dataset = open_dataset(opts.dataset)
    if not dataset.plait:
        raise ValueError(f"dataset {opts.dataset!r}: not a plait dataset (no manifest.json): filter needs the "
                         "per-sample records that `plait prep shard` writes")
    src = OutputDir(opts.dataset)
    if OutputDir(opts.output).root.rstrip("/") == src.root.rstrip("/"):
        raise ValueError(f"--output {opts.output!r}: must differ from the source dataset")
    pool = load_pool(src, dataset.shards)
    settings = {k: v for k, v in asdict(opts).items() if k not in (
        "dataset", "output", "device", "progress", "dedup_work", "dedup_processes", "dedup_units")}
    settings["caption_rules"] = list(opts.caption_rules)
    settings["image_rules"] = list(opts.image_rules or ())
    settings["decontaminate"] = list(opts.decontaminate)
    settings["scores"] = opts.scores_folder  # resolved: a rerun without --scores is the same command
    out = OutputDir(opts.output)
    out.claim("--output", "_plan.json", lambda p: isinstance(p, dict) and isinstance(p.get("filter"), dict),
              "plait prep filter")
    provenance = {"source": opts.dataset, "source_fingerprint": dataset.fingerprint, **settings}
    if out.exists("_plan.json"):
        have = out.read_json("_plan.json").get("filter", {})
        diffs = [k for k in provenance if k in have and have[k] != provenance[k]] or (
            [] if have else ["not a filter output"])
        if diffs:
            raise ValueError(f"--output {opts.output!r} was filtered with other settings ({', '.join(diffs)}): use "
                             "a new output folder or the same settings")
    if out.exists(DECISIONS) and out.exists("_plan.json"):
        reasons = manifest.read_records(out, DECISIONS, ["reason"]).column("reason").to_pylist()
        info = out.read_json("_plan.json")["filter"]
    else:
        from data_prep.curate.dedup import DedupPending
        try:
            reasons, info = decide(opts, dataset, src, pool)
        except DedupPending as pending:  # the units are an array's: this run only prepared them
            base = src.read_json("_plan.json") if src.exists("_plan.json") else {}
            out.write_json("_plan.json", {**base, "output": opts.output, "filter": provenance})  # claims NEW
            return {"dedup_pending": str(pending)}
        kept = sum(r is None for r in reasons)
        if not kept:
            counts = Counter(reason_kind(r) for r in reasons)
            raise ValueError(f"the filter keeps nothing of the {len(reasons)} samples of {opts.dataset!r} ("
                             f"{', '.join(f'{k}: {v}' for k, v in counts.most_common())}): loosen the thresholds")
        base = src.read_json("_plan.json") if src.exists("_plan.json") else {}
        info = {**provenance, **info}
        out.write_json("_plan.json", {**base, "output": opts.output, "filter": info})
        table = pa.table({"key": pool.column("key"), "reason": pa.array(reasons, pa.string())})
        buf = io.BytesIO()
        pq.write_table(table, buf)
        out.write_bytes(DECISIONS, buf.getvalue())
    records = pool.to_pylist()
    by_shard: dict[int, list[dict]] = {}
    for pos, (rec, reason) in enumerate(zip(records, reasons)):
        rec.update(row=pos, status="ok" if reason is None else "rejected", reason=reason, transient=False,
                   num_samples=rec["num_samples"] if reason is None else 0)
        by_shard.setdefault(rec["shard"], []).append(rec)
    bar = _bar(opts.progress, len(dataset.shards))
    ids, copied = [], 0
    for name in dataset.shards:
        sid = int(name.removesuffix(".tar"))
        ids.append(sid)
        if not out.exists(f"{name.removesuffix('.tar')}_stats.json"):
            recs = by_shard.get(sid, [])
            copy_shard(src, out, name, recs, {r["key"] for r in recs if r["status"] == "ok"})
            copied += 1
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    summary = manifest.write_dataset_manifests(out, ids)
    seconds = time.monotonic() - started
    return {**summary, "filter": info, "shards_copied": copied, "seconds": round(seconds, 3)}


def _bar(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, unit=" shards", file=sys.stderr, dynamic_ncols=True, mininterval=0.5, desc="filtering")


def format_summary(summary: dict[str, Any]) -> str:
    if "dedup_pending" in summary:
        return summary["dedup_pending"]
    n = summary["num_input_rows"]
    lines = [f"kept {summary['num_ok']} of {n} samples ({summary['num_ok'] / n:.1%}) in {summary['num_shards']} "
             f"shard(s); {summary['shards_copied']} shard(s) written in {summary['seconds']:.1f} s"]
    lines += [f"  {count:>8}  {reason}" for reason, count in summary["reasons"].items()]
    return "\n".join(lines)
