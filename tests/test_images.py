"""ditlib/images.py: every image mode becomes the RGB it shows."""
import numpy as np
import pytest


def test_images_of_every_mode_become_the_rgb_they_show(tmp_path):
    from PIL import Image

    from ditlib.images import load_rgb

    def saved(image, name, **kwargs):
        image.save(tmp_path / name, **kwargs)
        return np.asarray(load_rgb(str(tmp_path / name))).astype(int)

    grey16 = Image.fromarray(np.full((4, 6), 32768, np.uint16))  # 50% grey, 16 bits
    assert grey16.mode == "I;16" and (saved(grey16, "g16.png") == 128).all()  # PIL's convert("RGB") gives 255
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((1, 1), 1)
    rgb = saved(palette, "p.png")
    assert rgb[0, 0].tolist() == [255, 0, 0] and rgb[1, 1].tolist() == [0, 0, 255]
    assert saved(palette, "pt.png", transparency=1)[1, 1].tolist() == [255, 255, 255]  # transparent: over white
    assert np.abs(saved(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "c.jpg")[0, 0] - [255, 0, 0]).max() <= 2
    assert saved(Image.new("LA", (4, 4), (0, 0)), "la.png")[0, 0].tolist() == [255, 255, 255]
    assert saved(Image.new("RGBA", (4, 4), (0, 0, 200, 255)), "rgba.png")[0, 0].tolist() == [0, 0, 200]
    half = saved(Image.new("RGBA", (4, 4), (0, 0, 0, 128)), "half.png")[0, 0]
    assert half.tolist() == [127, 127, 127]
    # EXIF orientation 6 (the camera was turned; viewers rotate 90 degrees clockwise): 6x4 shows as 4x6.
    photo = Image.new("RGB", (6, 4), (0, 0, 0))
    photo.putpixel((0, 0), (255, 255, 255))
    exif = Image.Exif()
    exif[0x0112] = 6
    upright = saved(photo, "exif.png", exif=exif)
    assert upright.shape == (6, 4, 3) and upright[0, 3].tolist() == [255, 255, 255]
    Image.new("F", (2, 2)).save(tmp_path / "float.tif")
    with pytest.raises(ValueError, match="mode F"):  # no fixed range to scale from
        load_rgb(str(tmp_path / "float.tif"))


def test_symbolic_link_loops_and_links_across_classes_are_refused(tmp_path):
    """`ln -s .. data/c0/loop` made 16 images 7,216 and labelled one class's images as the other's."""
    from helpers import make_image_folder

    from ditlib.images import image_folder
    data = make_image_folder(tmp_path / "data")
    outside = make_image_folder(tmp_path / "elsewhere", classes=1) / "class_0"
    (data / "class_2").symlink_to(outside)  # a class folder that is a link: fine
    assert len(image_folder(str(data), 16)) == 24
    (data / "class_0" / "loop").symlink_to("..")
    with pytest.raises(ValueError, match=r"class_0/loop links to .*data, a folder read already \(a loop"):
        image_folder(str(data), 16)
    (data / "class_0" / "loop").unlink()
    (data / "class_0" / "other").symlink_to(data / "class_1")
    with pytest.raises(ValueError, match="class_0/other links to .*class_1, outside its class folder class_0; its "
                                         "images would be labelled class_0"):
        image_folder(str(data), 16)
