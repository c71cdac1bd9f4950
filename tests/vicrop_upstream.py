"""Verbatim port of ViCrop's crop search, used as the reference in tests/test_roi.py.

Source:  https://github.com/saccharomycetes/mllms_know
Path:    utils.py, function ``bbox_from_att_image_adaptive`` (utils.py lines 60-144)
Commit:  a64c5d5a0ece793a2f7dc96e926d283a199033c1 (HEAD, 2025-04-20); utils.py blob
         4bfbcaac5868bc926f75eacc43f90ddcfb84c95c. The function body is unchanged since
         8873a550584d9de8a70deb3e43121e8fe910f156 (2025-03-07).
Licence: upstream's README says "This project is licensed under the MIT License"; the
         repository at that commit ships no top-level LICENSE file.
Callers: upstream's run.py calls it as ``bbox_from_att_image_adaptive(att_map, image.size,
         bbox_size)`` with a PIL image, so ``image_size`` is the (width, height) tuple; the
         function never resizes the attention map and needs nothing but numpy.

Edits made to run it here (the function body itself is NOT changed):
  1. Only this one function is copied; upstream utils.py's module-level imports
     (torchvision, scipy, skimage, qwen_vl_utils, io, base64, os) are dropped, since the
     function uses none of them. ``import numpy as np`` is kept.
  2. Trailing whitespace stripped from lines (whitespace only).
  3. This header is an addition. No line of the function's code, loops, arithmetic or
     variable names is altered, and its docstring and comments are kept as they are.

Known upstream behaviours this verbatim copy keeps (see tests/test_roi.py):
  - ``block_num`` has no lower bound of 1: when a cell is wider than ``bbox_size * ratio``
    original pixels it is 0, the windows are empty, ``difference`` is 0/0 = nan (a numpy
    RuntimeWarning) and ``np.argmax`` picks that nan ratio.
  - For non-integer ratios ``selected_bbox_size`` is a float, so the returned coordinates are
    floats (e.g. 201.0) rather than ints.
"""

import numpy as np


def bbox_from_att_image_adaptive(att_map, image_size, bbox_size=336):
    """
    Generates an adaptive bounding box for original image from an attention map.

    This function finds the region with the highest attention in the attention map
    and creates a bounding box around it. It tries different crop ratios and selects
    the one that produces the sharpest attention difference.

    Args:
        att_map: A 2D numpy array representing the attention map (e.g., 24x24 for LLaVA or 16x16 for BLIP)
        image_size: Tuple of (width, height) of the original image
        bbox_size: Base size for the bounding box (default: 336)

    Returns:
        tuple: (x1, y1, x2, y2) coordinates of the bounding box in the original image
    """

    # the ratios corresponds to the bounding box we are going to crop the image
    ratios = [1, 1.2, 1.4, 1.6, 1.8, 2]

    max_att_poses = []
    differences = []
    block_nums = []

    for ratio in ratios:
        # perform a bbox_size*r width and bbox_size*r height crop, where bbox_size is the size of the model's original image input resolution. (336 for LLaVA, 224 for BLIP)

        # the size of each block in the attention map, in the original image
        block_size = image_size[0] / att_map.shape[1], image_size[1] / att_map.shape[0]

        # if I want a bbox_size*r width and bbox_size*r height crop from the original image, the number of blocks I need (x, y)
        block_num = (
            min(int(bbox_size * ratio / block_size[0]), att_map.shape[1]),
            min(int(bbox_size * ratio / block_size[1]), att_map.shape[0]),
        )
        if att_map.shape[1] - block_num[0] < 1 and att_map.shape[0] - block_num[1] < 1:
            if ratio == 1:
                return 0, 0, image_size[0], image_size[1]
            else:
                continue
        block_nums.append((block_num[0], block_num[1]))

        # attention aggregation map
        sliding_att = np.zeros((att_map.shape[0] - block_num[1] + 1, att_map.shape[1] - block_num[0] + 1))
        max_att = -np.inf
        max_att_pos = (0, 0)

        # sliding window to find the block with the highest attention
        for x in range(att_map.shape[1] - block_num[0] + 1):
            for y in range(att_map.shape[0] - block_num[1] + 1):
                att = att_map[y : y + block_num[1], x : x + block_num[0]].sum()
                sliding_att[y, x] = att
                if att > max_att:
                    max_att = att
                    max_att_pos = (x, y)

        # we have the position of max attention, we can calculate the difference between the max attention and the average of its adjacent attentions, to see if it is sharp enough, the more difference, the sharper
        # we choose the best ratio r according to their attention difference
        adjcent_atts = []
        if max_att_pos[0] > 0:
            adjcent_atts.append(sliding_att[max_att_pos[1], max_att_pos[0] - 1])
        if max_att_pos[0] < sliding_att.shape[1] - 1:
            adjcent_atts.append(sliding_att[max_att_pos[1], max_att_pos[0] + 1])
        if max_att_pos[1] > 0:
            adjcent_atts.append(sliding_att[max_att_pos[1] - 1, max_att_pos[0]])
        if max_att_pos[1] < sliding_att.shape[0] - 1:
            adjcent_atts.append(sliding_att[max_att_pos[1] + 1, max_att_pos[0]])
        difference = (max_att - np.mean(adjcent_atts)) / (block_num[0] * block_num[1])
        differences.append(difference)
        max_att_poses.append(max_att_pos)
    max_att_pos = max_att_poses[np.argmax(differences)]
    block_num = block_nums[np.argmax(differences)]
    selected_bbox_size = bbox_size * ratios[np.argmax(differences)]

    x_center = int(max_att_pos[0] * block_size[0] + block_size[0] * block_num[0] / 2)
    y_center = int(max_att_pos[1] * block_size[1] + block_size[1] * block_num[1] / 2)

    x_center = selected_bbox_size // 2 if x_center < selected_bbox_size // 2 else x_center
    y_center = selected_bbox_size // 2 if y_center < selected_bbox_size // 2 else y_center
    x_center = (
        image_size[0] - selected_bbox_size // 2 if x_center > image_size[0] - selected_bbox_size // 2 else x_center
    )
    y_center = (
        image_size[1] - selected_bbox_size // 2 if y_center > image_size[1] - selected_bbox_size // 2 else y_center
    )

    x1 = max(0, x_center - selected_bbox_size // 2)
    y1 = max(0, y_center - selected_bbox_size // 2)
    x2 = min(image_size[0], x_center + selected_bbox_size // 2)
    y2 = min(image_size[1], y_center + selected_bbox_size // 2)

    return x1, y1, x2, y2
