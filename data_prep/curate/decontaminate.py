"""Eval-set decontamination for `plait prep filter --decontaminate EVAL`: drops every training sample whose image
is a near-duplicate of an evaluation image, so that a zero-shot or retrieval number on EVAL measures
generalisation, not recall (DataComp removed such near-duplicates from its pool).

Two tests, either one is enough:
  pHash     imagehash's 64-bit DCT perceptual hash of each image, from the shard members; Hamming distance
            <= --decontaminate-hamming. Sees the picture's coarse luminance layout, so it survives re-encodes,
            resizes and mild crops (a few % per side), whatever the model; flat images hash alike.
  embedding the score folder's image embeddings of the training set (`plait prep score --embeddings`) against the
            evaluation images' embeddings under the same model (the score plan names it, its fingerprint is
            checked); cosine >= --decontaminate-cosine. Can catch what moves the hash (larger crops, flips,
            overlays), as far as the model tells images apart; its threshold belongs to the model.
Both searches are exact and blocked (each training chunk against the whole evaluation set), so memory is the
evaluation set's hashes and embeddings plus one chunk: cost N_train x N_eval, fine for evaluation sets of
10^4-10^5 images.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from data_prep.curate.score_set import open_dataset
from data_prep.shards.members import IMAGE_KEYS, MemberKeys, open_image
from data_prep.shards.tarwalk import TarFormatError, iter_samples
from data_prep.shards.writer import OutputDir

CHUNK_ELEMENTS = 1 << 22
"""Training x evaluation pairs compared at once (32 MiB of uint64 XORs, 16 MiB of float32 dot products)."""


def check_thresholds(sets: tuple[str, ...], cosine: float, hamming: int) -> None:
    """ValueError naming the flag for a threshold out of range or a decontamination that tests nothing."""
    if not 0.0 <= cosine <= 1.0:
        raise ValueError(f"--decontaminate-cosine {cosine}: a cosine threshold must be in (0, 1] (0: off)")
    if not -1 <= hamming <= 64:
        raise ValueError(f"--decontaminate-hamming {hamming}: a 64-bit pHash distance must be in [0, 64] (-1: off)")
    if sets and cosine == 0 and hamming < 0:
        raise ValueError("--decontaminate with --decontaminate-cosine 0 and --decontaminate-hamming -1 tests "
                         "nothing: keep one of them")


@dataclass
class Images:
    """What the tests compare of one image set, aligned to `keys` (undecodable images are left out, and named)."""
    keys: list[str]
    phash: np.ndarray
    """[N] uint64: imagehash's 8x8 pHash bits, row-major, packed big-endian."""
    undecodable: dict[str, str]
    """key -> why its image could not be hashed."""


def phash_bits(image) -> int:
    import imagehash
    bits = imagehash.phash(image).hash.reshape(-1)  # [64] bool
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def iter_images(url: str, shards: list[str], keys: MemberKeys, what: str) -> Iterator[tuple[str, bytes, Any]]:
    """(key, image bytes, PIL image) for every sample of the shards in tar order; (key, b"", reason) for a
    sample without a decodable image. The image member is the one `plait prep score` reads (a video's middle
    frame)."""
    src = OutputDir(url)
    for name in shards:
        with src.fs.open(src.path(name), "rb") as f:
            try:
                for sample in iter_samples(f, want=keys.wants):
                    members = {ext: data for ext, data in sample.members if data is not None}
                    media, _ = keys.image_members(members)
                    if not media:
                        yield sample.key, b"", keys.missing_image(members)
                        continue
                    data = members[media[len(media) // 2]]
                    try:
                        image = open_image(data)
                        image.load()
                    except Exception as e:  # PIL raises many types for a corrupt image: each is a reason
                        yield sample.key, b"", f"undecodable ({type(e).__name__}: {e})"
                    else:
                        yield sample.key, data, image
            except TarFormatError as exn:
                raise ValueError(f"{what}: {src.path(name)} is an unreadable tar ({exn})") from None


def hash_images(url: str, shards: list[str], keys: MemberKeys, what: str, progress: bool,
                on_image: Callable[[bytes], None] | None = None) -> Images:
    """The pHash of every decodable image; `on_image(data)` sees each hashed image's bytes too."""
    names, hashes, bad = [], [], {}
    bar = _bar(progress, f"hashing {what}")
    for key, data, image in iter_images(url, shards, keys, what):
        if isinstance(image, str):
            bad[key] = image
        else:
            names.append(key)
            hashes.append(phash_bits(image))
            if on_image is not None:
                on_image(data)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return Images(names, np.array(hashes, np.uint64), bad)


def embed_images(model: dict, dim: int, what: str):
    """(on_image callback, finish() -> [M, dim] float32 L2-normalised) under the scoring model (the score plan's
    `model`: path and fingerprint), in batches."""
    import torch
    from data_prep.curate.score import load_scorer, model_fingerprint
    from pipeline.data.transforms import decode_image, decode_min_side, split_transform, to_uint8

    model_path = model["path"]
    try:
        now = model_fingerprint(model_path)["sha256"]
    except OSError as e:
        raise ValueError(f"{what}: the scoring model {model_path!r} of the score folder cannot be read ({e})") from None
    if now != model.get("sha256"):
        raise ValueError(f"{what}: the scoring model at {model_path!r} has changed since the training set was "
                         "scored (its fingerprint differs): rescore, or use --decontaminate-cosine 0")
    loaded, got = load_scorer(model_path)
    if got != dim:
        raise ValueError(f"{what}: the scoring model {model_path!r} embeds images in {got} dimensions, the score "
                         f"folder's embeddings have {dim}: embeddings of the wrong dimension")
    net = loaded.model.eval()
    head, normalize = split_transform(loaded.transform)
    min_side = decode_min_side(loaded.transform)
    pending: list = []
    out: list[np.ndarray] = []

    @torch.inference_mode()
    def flush() -> None:
        if not pending:
            return
        batch = torch.stack(pending)  # [B, 3, H, W]
        if normalize is not None:
            batch = normalize(batch)
        out.append(torch.nn.functional.normalize(net.encode_image(batch.float()).float(), dim=-1).numpy())
        pending.clear()

    def on_image(data: bytes) -> None:
        image = head(decode_image(data, min_side))  # decoded as `plait prep score` decodes: same embedding
        pending.append(to_uint8(image) if normalize is not None else image)
        if len(pending) == 256:
            flush()

    def finish() -> np.ndarray:
        flush()
        return np.concatenate(out) if out else np.zeros((0, dim), np.float32)

    return on_image, finish


def nearest_hamming(train: np.ndarray, evals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each training hash [N] the nearest evaluation hash [M]: (index [N], Hamming distance [N])."""
    idx, dist = np.zeros(len(train), np.int64), np.full(len(train), 65, np.int64)
    step = max(1, CHUNK_ELEMENTS // max(1, len(evals)))
    for s in range(0, len(train), step):
        d = np.bitwise_count(train[s:s + step, None] ^ evals[None, :])  # [c, M] uint8
        idx[s:s + step] = d.argmin(1)
        dist[s:s + step] = d[np.arange(len(d)), idx[s:s + step]]
    return idx, dist


def nearest_cosine(train: np.ndarray, evals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each training embedding [N, D] the nearest evaluation embedding [M, D] (both L2-normalised):
    (index [N], cosine [N])."""
    idx, cos = np.zeros(len(train), np.int64), np.full(len(train), -np.inf, np.float32)
    step = max(1, CHUNK_ELEMENTS // max(1, len(evals)))
    for s in range(0, len(train), step):
        sims = train[s:s + step].astype(np.float32) @ evals.T  # [c, M]
        idx[s:s + step] = sims.argmax(1)
        cos[s:s + step] = sims[np.arange(len(sims)), idx[s:s + step]]
    return idx, cos


def decontaminate(opts, src: OutputDir, shards: list[str], keys: list[str], reasons: list[str | None],
                  train_emb: np.ndarray | None, plan: dict | None) -> dict[str, Any]:
    """Sets `reasons[i]` (where still None) for every training sample `keys[i]` near an image of an evaluation
    set of `opts.decontaminate`; returns the provenance (each set, its fingerprint, the thresholds, counts)."""
    use_cos, use_hash = opts.decontaminate_cosine > 0, opts.decontaminate_hamming >= 0
    image_keys = MemberKeys.parse(image_keys=IMAGE_KEYS)
    where = {k: i for i, k in enumerate(keys)}
    train = hash_images(src.url, shards, image_keys, "the training set", opts.progress) if use_hash else None
    if train is not None:
        train_pos = np.array([where[k] for k in train.keys if k in where], np.int64)
        train_hash = np.array([h for k, h in zip(train.keys, train.phash) if k in where], np.uint64)
    info: dict[str, Any] = {"cosine": opts.decontaminate_cosine if use_cos else None,
                            "hamming": opts.decontaminate_hamming if use_hash else None,
                            "model": plan["model"] if use_cos else None, "sets": []}
    if train is not None:
        info["train_unhashed"] = {k: r for k, r in list(train.undecodable.items())[:10]}
        info["num_train_unhashed"] = len(train.undecodable)
    for url in opts.decontaminate:
        what = f"--decontaminate {url!r}"
        try:
            dataset = open_dataset(url)
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(f"{what}: not an evaluation dataset ({str(e).split(': ', 1)[-1]})") from None
        on_image = finish = None
        if use_cos:
            on_image, finish = embed_images(plan["model"], plan["embedding_dim"], what)
        evals = hash_images(dataset.url, dataset.shards, image_keys, f"eval set {url}", opts.progress, on_image)
        if not evals.keys:
            first = next(iter(evals.undecodable.values()), "no samples")
            raise ValueError(f"{what}: no images in its {len(evals.undecodable)} sample(s) ({first})")
        hits: dict[int, str] = {}  # pool position -> reason; pHash first, then embeddings
        if use_hash:
            near, dist = nearest_hamming(train_hash, evals.phash)
            for p, j, d in zip(train_pos, near, dist):
                if d <= opts.decontaminate_hamming:
                    hits[int(p)] = f"contaminated: near-duplicate of {url}/{evals.keys[j]} (phash distance {d})"
        num_hash = len(hits)
        if use_cos:
            eval_emb = finish()
            near, cos = nearest_cosine(train_emb, eval_emb)
            for p in np.flatnonzero(cos >= opts.decontaminate_cosine):
                hits.setdefault(int(p), f"contaminated: near-duplicate of {url}/{evals.keys[near[p]]} "
                                        f"(embedding cosine {cos[p]:.4f})")
        rejected = 0
        for p, reason in sorted(hits.items()):
            if reasons[p] is None:
                reasons[p] = reason
                rejected += 1
        info["sets"].append({"url": url, "fingerprint": dataset.fingerprint, "num_images": len(evals.keys),
                             "num_undecodable": len(evals.undecodable), "near_duplicates": len(hits),
                             "by_phash": num_hash, "by_embedding_only": len(hits) - num_hash,
                             "rejected": rejected})
    return info


def _bar(enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(unit=" images", file=sys.stderr, dynamic_ncols=True, mininterval=0.5, desc=desc)
