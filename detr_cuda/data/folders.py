"""Image files in folders: which files count as images, listing them, and image ids from file names.

Shared by the YOLO reader (an image folder is the data set) and ``tools/infer.py`` (folders of photos).
"""
import os

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def list_image_files(folder, recursive=False):
    """Paths relative to ``folder`` of its files with an image extension (any letter case), sorted;
    with ``recursive`` its sub-folders' too."""
    if not recursive:
        return sorted(name for name in os.listdir(folder)
                      if name.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, name)))
    found = []
    for current, folders, names in os.walk(folder):
        folders.sort()
        found.extend(os.path.relpath(os.path.join(current, name), folder)
                     for name in names if name.lower().endswith(IMAGE_EXTENSIONS))
    return sorted(found)


def image_ids_from_names(paths):
    """{path: image id}: the file name's number when every stem is a distinct integer (COCO's
    000000000009.jpg -> 9), else 1..N in the order given. Pass only the files that are used: a
    stray file must not renumber the others."""
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    if all(s.isdigit() for s in stems) and len({int(s) for s in stems}) == len(stems):
        return {p: int(s) for p, s in zip(paths, stems)}
    return {p: i + 1 for i, p in enumerate(paths)}
