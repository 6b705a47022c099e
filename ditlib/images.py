"""Images in and out: reading any image file as RGB, the ADM crop, ImageFolder data, PNG grids."""
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image, ImageOps

from ditlib.errors import first_line
from ditlib.files import atomic_write


def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
    """ADM's crop: halve with BOX while the short side is >= 2x the target, BICUBIC-resize, centre crop."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size])


def load_rgb(path: str) -> Image.Image:
    """Open an image as 8-bit RGB as it is meant to be seen (to_rgb, after the EXIF orientation);
    a file that cannot be decoded is named in the error."""
    try:
        with open(path, "rb") as handle:
            return to_rgb(ImageOps.exif_transpose(Image.open(handle)))
    except Exception as error:
        raise ValueError(f"cannot read image {path}: {error}") from error


SIXTEEN_BIT_GREY = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any mode PIL opens. 16-bit grey is scaled to 8 bits (PIL's convert would clip
    it, making mid-grey white); transparency is composited over white; palette, grey and CMYK
    images are converted by PIL. Floating-point images have no fixed range and are refused."""
    if image.mode in SIXTEEN_BIT_GREY:
        grey = np.asarray(image).astype(np.int64)
        if grey.min() < 0 or grey.max() > 65535:
            raise ValueError(f"a {image.mode} image with values outside 16 bits ({grey.min()}..{grey.max()})")
        image = Image.fromarray(((grey * 255 + 32767) // 65535).astype(np.uint8))
    elif image.mode == "F":
        raise ValueError("a floating-point (mode F) image has no fixed value range; save it with 8 or 16 bits")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("LA", "La", "PA", "RGBA", "RGBa") or (image.mode in ("L",
                                                                           "RGB") and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")


def unreadable_images(paths: list, decode: bool) -> list:
    """'path (reason)' for every file that cannot be opened: the header only (decode=False: fast
    enough for every run's start), or the whole image (decode=True: train.py --check-data)."""
    def problem(path: str) -> Optional[str]:
        try:
            if decode:
                load_rgb(path)
            else:
                with Image.open(path):
                    pass
            return None
        except Exception as error:
            return f"{path} ({first_line(error.__cause__ or error).replace(f' {path!r}', '')})"

    with ThreadPoolExecutor(max_workers=8) as pool:  # file reads and PIL's decoders release the GIL
        return [found for found in pool.map(problem, paths) if found]


def readable_png(path: Path) -> bool:
    """Whether a sample PNG is complete (a rerun of sample_ddp.py keeps it)."""
    try:
        with Image.open(path) as image:
            image.load()
        return True
    except Exception:
        return False


def image_folder(data_path: Optional[str], image_size: int):
    """ImageFolder of centre-cropped images in [-1, 1] (no flip: train.py flips per batch, seeded)."""
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    if not data_path:
        raise ValueError("--data-path is required (a folder with one sub-folder of images per class)")
    if not Path(data_path).is_dir():
        raise ValueError(f"--data-path {data_path} is not a folder")
    check_folder_links(data_path)
    transform = transforms.Compose([
        transforms.Lambda(lambda pil_image: center_crop_arr(pil_image, image_size)),
        transforms.ToTensor(),
        transforms.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5], inplace=True),
    ])
    try:
        return ImageFolder(data_path, transform=transform, loader=load_rgb)
    except FileNotFoundError as error:
        raise ValueError(f"--data-path {data_path} holds no images in class sub-folders ({error})") from None


def check_folder_links(data_path: str) -> None:
    """ImageFolder follows symbolic links to folders: a link back up the tree is read again and again,
    and a link into another class folder labels its images as this class. Both stop here, named."""
    root = os.path.realpath(data_path)
    for class_entry in sorted(os.scandir(data_path), key=lambda e: e.name):
        if not class_entry.is_dir():
            continue
        class_root = os.path.realpath(class_entry.path)
        seen, folders = {class_root}, [class_entry.path]
        while folders:
            with os.scandir(folders.pop()) as entries:
                for entry in entries:
                    if not entry.is_dir():
                        continue
                    target = os.path.realpath(entry.path)
                    if target in seen or class_root.startswith(target + os.sep):
                        raise ValueError(f"--data-path: {entry.path} links to {target}, a folder read already (a loop "
                                         f"of symbolic links); remove the link")
                    inside_root = target.startswith(root + os.sep)
                    if inside_root and not target.startswith(class_root + os.sep):
                        raise ValueError(f"--data-path: {entry.path} links to {target}, outside its class folder "
                                         f"{class_entry.name}; its images would be labelled {class_entry.name}")
                    seen.add(target)
                    folders.append(entry.path)


def check_image_path(path: Union[str, Path], flag: str) -> None:
    """An output path must name an image format PIL can write, by its extension."""
    Image.init()
    if Path(path).suffix.lower() not in Image.EXTENSION:
        raise ValueError(f"{flag} {path}: give a file name with an image extension such as .png or .jpg")


def save_image_grid(images: torch.Tensor, path: Union[str, Path], nrow: int) -> Path:
    """Images in [-1, 1] as one PNG grid, written to a temporary name and renamed."""
    from torchvision.utils import save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as handle:
        save_image(images, handle, format=Image.registered_extensions()[path.suffix.lower()], nrow=nrow,
                   normalize=True, value_range=(-1, 1))
    return path


def save_png(array: np.ndarray, path: Path) -> None:
    """One (H, W, 3) uint8 image as a PNG, written atomically."""
    with atomic_write(path) as handle:
        Image.fromarray(array).save(handle, format="PNG")


def to_uint8_images(samples: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8, rounding as the official sample_ddp.py does."""
    return torch.clamp(127.5 * samples + 128.0, 0, 255).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8).numpy()
