r"""
Train GenTron text-to-video (Sec. 3.3) from a text-to-image checkpoint, with train_t2i.py's training loop: this
script adds the T2V flags and defaults, the video data (make_data_t2v) and the temporal model (model_config_t2v).

    python train_t2v.py --init-from runs/t2i                      # toy: moving shapes + shapes images, CPU
    torchrun --nproc_per_node 8 train_t2v.py --size G --init-from runs/g512/ckpt-0300000 \
        --data /data/videos --image-data /data/images --resolution 256 --batch-size 128 --out runs/t2v

Sec. 3.3.1: every block gets a temporal self-attention layer whose output projection starts at zero,
so the new model is the T2I model, frame by frame, at step 0. Sec. 3.3.2: with probability
p_motion_free a training sample is a motion-free pseudo-video - an image repeated T times with the
identity temporal mask - and otherwise a real clip ("joint image-video training"); the motion-free
flags go to the model, which is what motion-free guidance (Eq. 6) needs at sampling time.
"""

import cache
import train_t2i
from checkpoint import checkpoints
from data import ImageTextFolder, JointImageVideoDataset, VideoTextFolder
from synthetic import MovingShapesDataset, ShapesDataset
from train_data import bench_data, cached_data, online_data


def get_parser():
    p = train_t2i.get_parser()
    p.description = __doc__
    p.add_argument("--num-frames", type=train_t2i.bounded(int, 1), default=None,
                   help="frames per clip (default 8, Sec. 4.1: 8-frame clips at 4 fps; a cache: its own)")
    # The paper does not give p_motion_free. 0.5 weighs the two conditions of Eq. 6 (motion on / off)
    # equally, the way CFG needs both text and "" predictions, and spends half the samples on images,
    # whose per-frame quality the joint training is meant to keep (Sec. 3.3.2, "Solution I").
    p.add_argument("--p-motion-free", type=train_t2i.bounded(float, 0, 1), default=None,
                   help="fraction of motion-free pseudo-videos (default 0.5; a cache: its own)")
    p.add_argument("--image-data", default=None, help="image folder / .jsonl / .tar shards for the pseudo-videos of real --data")
    p.add_argument("--from-scratch", action="store_true", help="train without a T2I checkpoint (not the paper's recipe)")
    p.add_argument("--mfg-scale", type=train_t2i.bounded(float), default=1.2, help="lambda_M of Eq. 6 for samples.png")  # paper: 1.0-1.3
    p.set_defaults(data="moving_shapes", out="runs/t2v", batch_size=8, max_steps=600,
                   num_samples=8)  # toy: 8 clips per step; Sec. 4.1: 128 clips
    return p


def make_data_t2v(args, device):
    """--data for text-to-video: moving_shapes (+ shapes images) | bench | cache dir | video folder / .jsonl /
    .tar shards."""
    cached = cache.is_cache(args.data)
    if args.image_data and (cached or args.data in ("bench", "moving_shapes")):
        raise ValueError(f"--image-data is for a folder / .jsonl of real videos; --data {args.data} brings its own "
                         "images" + (" (in the cache)" if cached else ""))
    if cached:  # its clip length and motion-free draws; the flags given must agree with them
        data = cached_data(args.data, device, args.num_frames, text_encoder=args.text_encoder)
        cache.check_kind(data.dataset.meta, args.data, video=True)
        cache.check_flags(data.dataset.meta, args.data,
                          {"--num-frames": args.num_frames, "--p-motion-free": args.p_motion_free})
        return data
    frames = args.num_frames = args.num_frames or 8
    p = args.p_motion_free = 0.5 if args.p_motion_free is None else args.p_motion_free
    if args.data == "bench":
        return bench_data(args, device, frames=frames, p_motion_free=p)
    if args.data == "moving_shapes":
        size = args.resolution or 32
        videos = MovingShapesDataset("train", num_frames=frames, size=size, seed=args.seed)
        images = ShapesDataset("train", size=size, seed=args.seed, categories=("single",))  # one object, as clips
        ds = JointImageVideoDataset(videos, images, p, frames, seed=args.seed)
        return online_data(ds, f"{videos.spec}+{images.spec}:p_motion_free={p}", args, device, frames)
    if p > 0 and not args.image_data:
        raise ValueError("real video --data needs --image-data for the motion-free pseudo-videos (or --p-motion-free 0)")
    videos = VideoTextFolder(args.data, size=args.resolution or 256, num_frames=frames, seed=args.seed)
    images = ImageTextFolder(args.image_data, size=args.resolution or 256) if args.image_data else None
    ds = JointImageVideoDataset(videos, images, p, frames, seed=args.seed)
    return online_data(ds, f"{args.data}+{args.image_data}:p_motion_free={p}", args, device, frames)


def model_config_t2v(args, data):
    """The T2I config with a temporal self-attention layer in every block (Sec. 3.3.1), for clips of data.frames."""
    return train_t2i.model_config(args, data, temporal=True, num_frames=data.frames)


def main(argv=None):
    args = get_parser().parse_args(argv)
    if args.init_from and args.from_scratch:  # one of them would be ignored
        raise ValueError(f"--init-from {args.init_from} and --from-scratch contradict each other: pass one of them")
    if not (args.init_from or args.from_scratch or (args.resume and checkpoints(args.out))):
        raise SystemExit("train_t2v.py starts from a T2I checkpoint (Sec. 3.3.1): pass --init-from RUN/ckpt-N.pt "
                         f"(or --from-scratch){'; --resume found no checkpoint in ' + args.out if args.resume else ''}")
    return train_t2i.train(args, make_data_t2v, model_config_t2v, kind="t2v")


if __name__ == "__main__":
    train_t2i.cli(main)
