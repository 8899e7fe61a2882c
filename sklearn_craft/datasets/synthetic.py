"""Procedurally drawn, labelled face-like images: the data of the embedded demo.

Every image is rendered with numpy alone from a handful of parameters, so a data set of a few
thousand small faces takes about a second and needs no download. Identities have fixed traits
(skin, hair, face shape, eye spacing, ...), and each image varies in head yaw, smile, glasses and
age on top of nuisance factors (position, scale, roll, lighting, background, pixel noise). A network
trained to recognise identities must become invariant to those per-image factors, yet its early
filters still respond to them: the situation CRAFT exploits.
"""

import numbers

import numpy as np
import pandas as pd
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, validate_params

# Images are rendered in blocks so that memory stays small for large sizes.
_CHUNK = 256

_SKIN_TONES = np.array(
    [
        [0.98, 0.84, 0.72],
        [0.93, 0.75, 0.60],
        [0.84, 0.64, 0.48],
        [0.70, 0.50, 0.36],
        [0.52, 0.36, 0.25],
        [0.38, 0.26, 0.18],
    ]
)
_HAIR_COLOURS = np.array(
    [
        [0.08, 0.06, 0.05],
        [0.28, 0.17, 0.09],
        [0.50, 0.32, 0.16],
        [0.85, 0.70, 0.40],
        [0.62, 0.25, 0.10],
    ]
)
_IRIS_COLOURS = np.array([[0.30, 0.18, 0.08], [0.20, 0.40, 0.65], [0.30, 0.45, 0.25], [0.10, 0.08, 0.06]])
_GREY_HAIR = np.array([0.78, 0.78, 0.80])


def _image_shape(image_size):
    if isinstance(image_size, numbers.Integral):
        height = width = int(image_size)
    else:
        height, width = (int(v) for v in image_size)
    if height < 16 or width < 16:
        raise ValueError(f"image_size must be at least 16 pixels on each side, got {image_size!r}")
    return height, width


def _draw_identities(rng, n_identities):
    """Fixed traits of each identity, as arrays of length ``n_identities``."""
    k = n_identities
    male = rng.rand(k) < 0.5
    skin = _SKIN_TONES[rng.randint(len(_SKIN_TONES), size=k)] * rng.uniform(0.95, 1.05, (k, 3))
    return {
        "male": male,
        "skin": np.clip(skin, 0, 1),
        "hair": _HAIR_COLOURS[rng.randint(len(_HAIR_COLOURS), size=k)],
        "iris": _IRIS_COLOURS[rng.randint(len(_IRIS_COLOURS), size=k)],
        "face_rx": rng.uniform(0.50, 0.66, k) + 0.03 * male,
        "face_ry": rng.uniform(0.70, 0.82, k),
        "face_power": rng.uniform(1.8, 3.0, k),
        "eye_spacing": rng.uniform(0.17, 0.27, k),
        "eye_height": rng.uniform(-0.12, 0.0, k),
        "eye_size": rng.uniform(0.075, 0.11, k),
        "brow_thickness": rng.uniform(0.025, 0.04, k) + 0.02 * male,
        "nose_length": rng.uniform(0.10, 0.20, k),
        "mouth_height": rng.uniform(0.32, 0.42, k),
        "mouth_width": rng.uniform(0.14, 0.22, k),
        "hairline": rng.uniform(0.38, 0.62, k),
        "long_hair": np.where(male, rng.rand(k) < 0.1, rng.rand(k) < 0.85),
        "beard": male & (rng.rand(k) < 0.4),
        "base_age": rng.uniform(22, 70, k),
        "greying": rng.uniform(0.6, 1.2, k),
    }


def _soft(signed_distance, pixel):
    """Anti-aliased coverage of a shape given an (approximate) signed distance to its edge."""
    return np.clip(0.5 - signed_distance / pixel, 0.0, 1.0)


def _ellipse(x, y, cx, cy, rx, ry, pixel):
    r = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
    return _soft((r - 1.0) * np.minimum(rx, ry), pixel)


def _paint(canvas, alpha, colour):
    """Alpha-blend ``colour`` (n, 3) over ``canvas`` (n, H, W, 3) where ``alpha`` (n, H, W) is set."""
    # Most features cover a small part of the image: blend only the pixels they touch.
    where = np.nonzero(alpha)
    a = alpha[where][:, None]
    canvas[where] += a * (np.asarray(colour, dtype=np.float32)[where[0]] - canvas[where])


def _render(p, height, width, rng, noise):
    """Draw one block of faces from the per-image parameters ``p`` (arrays of length n)."""
    n = len(p["yaw"])

    def col(values):
        """Per-image values as an (n, 1, 1) column that broadcasts over the pixel grid."""
        return np.asarray(values, dtype=np.float32).reshape(n, 1, 1)

    pixel = 2.0 / height
    gy = ((np.arange(height) + 0.5) / height * 2 - 1).astype(np.float32)
    gx = ((np.arange(width) + 0.5) / width * 2 - 1).astype(np.float32) * (width / height)
    X, Y = gx[None, None, :], gy[None, :, None]

    # Head frame: translate, roll and scale the pixel grid once, draw everything in it.
    roll = np.radians(col(p["roll"]))
    scale = col(p["scale"])
    dx, dy = X - col(p["cx"]), Y - col(p["cy"])
    x = (dx * np.cos(roll) + dy * np.sin(roll)) / scale
    y = (-dx * np.sin(roll) + dy * np.cos(roll)) / scale
    px = pixel / scale

    canvas = np.empty((n, height, width, 3), dtype=np.float32)
    bg = p["background"]
    tint = 1.0 + 0.25 * Y * col(p["bg_gradient"])
    canvas[:] = (bg[:, None, None, :] * tint[..., None]).astype(np.float32)

    yaw = np.radians(col(p["yaw"]))
    rx, ry, power = col(p["face_rx"]), col(p["face_ry"]), col(p["face_power"])
    hair = p["hair"] * (1 - p["grey"][:, None]) + _GREY_HAIR * p["grey"][:, None]

    # Long hair hangs behind the head; it swings toward the back of the turned head.
    long_alpha = _ellipse(x, y, rx * 0.35 * np.sin(yaw), 0.2, rx * 1.3, ry * 1.15, px) * (y > -0.3)
    _paint(canvas, long_alpha * col(p["long_hair"]), hair)

    # Head: a superellipse; its width at each row sets the cylinder onto which features are mapped.
    ay = np.clip(np.abs(y / ry), 0, 1)
    half_width = rx * np.clip(1 - ay**power, 1e-6, 1) ** (1 / power)
    head_r = (np.abs(x / rx) ** power + np.abs(y / ry) ** power) ** (1 / power)
    head = _soft((head_r - 1.0) * rx, px)
    # Surface coordinates: a pixel at x shows the point at angle phi of a head turned by yaw,
    # x = w(y) sin(phi - yaw); positive yaw therefore moves the features toward the image's left.
    phi = np.arcsin(np.clip(x / half_width, -1, 1)) + yaw
    a = phi * rx
    shade = 1.0 - 0.35 * col(p["light"]) * np.sin(phi - yaw + col(p["light_angle"]))
    skin = p["skin"]
    _paint(canvas, head, skin)

    def feature(alpha, colour):
        _paint(canvas, alpha * head, colour)

    # Beard: darker lower face on identities that have one.
    beard = _soft(0.18 - y, 2 * px) * _soft(np.abs(a) - rx * 1.1, px) * col(p["beard"])
    feature(0.45 * beard, hair * 0.6)

    # Age: forehead wrinkles and nasolabial folds whose contrast grows with age.
    wrinkle_age = col(np.clip((p["age"] - 30) / 45, 0, 1))
    period = max(0.09, 3.2 * pixel)
    forehead = (y < col(p["eye_height"]) - 0.12) & (y > -ry * col(p["hairline"]))
    lines = 0.5 + 0.5 * np.cos(2 * np.pi * y / period)
    feature(0.55 * wrinkle_age * lines * forehead * _soft(np.abs(a) - 0.3, px), skin * 0.55)
    fold_x = np.abs(a) - (0.07 + 0.45 * (y - col(p["eye_height"]) - 0.15))
    fold = _soft(np.abs(fold_x) - 0.012, px) * (y > col(p["eye_height"]) + 0.12) * (y < col(p["mouth_height"]))
    feature(0.6 * wrinkle_age * fold, skin * 0.55)

    # Hair on the head: above the hairline (which recedes with age on men) and on the back of the head.
    recede = 0.25 * col(p["male"]) * wrinkle_age
    hairline = -ry * (col(p["hairline"]) - recede) - 0.08 * (a / rx) ** 2
    on_hair = np.maximum(_soft(y - hairline, px), _soft(np.radians(75) - np.abs(phi), px * 3 / rx))
    feature(on_hair, hair)
    # Ears sit on the sides of the cylinder: hidden on a frontal face, one shows when the head turns,
    # its dark hollow on the side of the face.
    ear_y = col(p["eye_height"]) + 0.1
    for side in (-1.0, 1.0):
        feature(_ellipse(phi * rx, y, side * np.pi / 2 * rx, ear_y, 0.22 * rx, 0.16, px), skin * 0.85)
        feature(_ellipse(phi * rx, y, side * (np.pi / 2 - 0.1) * rx, ear_y, 0.1 * rx, 0.09, px), skin * 0.4)

    ey, es, ez = col(p["eye_height"]), col(p["eye_spacing"]), col(p["eye_size"])
    for side in (-1.0, 1.0):
        brow = _ellipse(a, y, side * es, ey - ez * 1.25, ez * 1.3, col(p["brow_thickness"]), px)
        feature(brow, hair * 0.7)
        feature(_ellipse(a, y, side * es, ey, ez, ez * 0.55, px), np.full((n, 3), 0.96))
        # The eyes keep looking at the camera: the irises turn against the head.
        iris_a = side * es + 0.5 * ez * np.sin(yaw)
        feature(_ellipse(a, y, iris_a, ey, ez * 0.5, ez * 0.5, px), p["iris"])
    # The nose sticks out of the cylinder: its tip moves further than the eyes when the head turns,
    # uncovering the nose's far side (shaded) between the bright ridge and the cheek.
    root, length = ey + 0.02, col(p["nose_length"])
    tip_shift = 0.25 * np.sin(yaw)
    along = (y > root) * _soft(y - root - length, px)
    ridge = -tip_shift * np.clip((y - root) / length, 0, 1)
    feature(0.8 * along * _soft(np.abs(a - ridge / 2) - np.abs(ridge) / 2, px), skin * 0.55)
    feature(0.7 * along * _soft(np.abs(a - ridge) - 0.015, px), np.clip(skin * 1.25, 0, 1))
    feature(_ellipse(a, y, -tip_shift, root + length, 0.05, 0.03, px), skin * 0.55)

    # Mouth: a band along a parabola; smiling bends its corners up (image y grows downward).
    mw, mh, bend = col(p["mouth_width"]), col(p["mouth_height"]), col(p["mouth_bend"])
    curve = mh - bend * (a / mw) ** 2 + bend * 0.3
    smiling = col(p["smile"])
    mw = mw * (1 + 0.2 * smiling)
    thickness = 0.035 + 0.045 * smiling
    lips = _soft(np.abs(y - curve) - thickness, px) * _soft(np.abs(a) - mw, px)
    feature(lips, np.clip(skin * np.array([0.85, 0.45, 0.45]) + 0.1 * p["lipstick"][:, None] * [1, -1, -1], 0, 1))
    # A smile opens the mouth on the teeth.
    teeth = smiling * _soft(np.abs(y - curve) - 0.04, px) * _soft(np.abs(a) - mw * 0.75, px)
    feature(teeth, np.full((n, 3), 0.95))

    # Glasses: two rings and a bridge, at the eye positions.
    rg = ez * 1.55
    for side in (-1.0, 1.0):
        r = np.sqrt((a - side * es) ** 2 + ((y - ey) * 1.25) ** 2)
        feature(col(p["glasses"]) * _soft(np.abs(r - rg) - 0.03, px), p["frame"])
    bridge = _soft(np.abs(y - ey + 0.02) - 0.025, px) * _soft(np.abs(a) - (es - rg), px)
    feature(col(p["glasses"]) * bridge, p["frame"])

    # Lighting is applied to the face only (shade), then to the whole image (brightness).
    face_mask = (head > 0)[..., None]
    canvas = np.where(face_mask, canvas * shade[..., None], canvas)
    canvas *= col(p["brightness"])[..., None]
    canvas += rng.normal(0.0, noise, canvas.shape).astype(np.float32)
    return np.clip(np.rint(canvas * 255), 0, 255).astype(np.uint8)


@validate_params(
    {
        "n_samples": [Interval(numbers.Integral, 1, None, closed="left")],
        "image_size": [Interval(numbers.Integral, 16, None, closed="left"), tuple, list],
        "n_identities": [Interval(numbers.Integral, 1, None, closed="left")],
        "max_yaw": [Interval(numbers.Real, 0, 90, closed="both")],
        "noise": [Interval(numbers.Real, 0, None, closed="left")],
        "random_state": ["random_state"],
    },
    prefer_skip_nested_validation=True,
)
def make_faces(n_samples=1000, image_size=32, n_identities=20, *, max_yaw=60.0, noise=0.03, random_state=None):
    """Generate procedurally drawn, labelled face-like RGB images.

    Each of ``n_identities`` identities has fixed traits (skin tone, hair colour and length, face
    width and shape, eye spacing and size, nose length, mouth position, beard, typical age). Each
    image then draws its own head yaw, smile, glasses and age, and nuisance factors that no label
    describes: position (±6 % of the image), scale (±8 %), roll (±10°), lighting direction and
    strength, brightness, background colour and Gaussian pixel noise. All tasks can be learnt from
    the pixels by a small CNN, none is trivial at 32×32.

    Parameters
    ----------
    n_samples : int, default=1000
        Number of images.
    image_size : int or (height, width), default=32
        Size of the images in pixels, at least 16 on each side. Faces keep their proportions when
        height and width differ.
    n_identities : int, default=20
        Number of distinct identities; images are spread uniformly over them.
    max_yaw : float, default=60.0
        Yaw is drawn uniformly from ``[-max_yaw, max_yaw]`` degrees (at most 90).
    noise : float, default=0.03
        Standard deviation of the Gaussian pixel noise, on the [0, 1] intensity scale.
    random_state : int, RandomState instance or None, default=None
        Seed of everything drawn; the same seed gives identical images and labels.

    Returns
    -------
    images : ndarray of shape (n_samples, height, width, 3), dtype uint8
        RGB images.
    labels : pandas.DataFrame of shape (n_samples, 7)
        One row per image, with the columns

        - ``identity`` (int): identity in ``0 .. n_identities - 1``, a categorical task;
        - ``male`` (bool): gender, a fixed trait of each identity (men have short hair more
          often, thicker brows and sometimes a beard; their hairline recedes with age);
        - ``age`` (float): years, 18 to 90; around a typical age of each identity (±8 years).
          Rendered as grey hair, forehead wrinkles and nasolabial folds;
        - ``yaw`` (float): degrees, positive when the face is turned toward the image's left
          (the AFLW2000 and Pointing'04 convention). Rendered by mapping the face onto a turning
          cylinder: the features shift sideways and are foreshortened, the nose moves most and
          hair of the back of the head appears;
        - ``roll`` (float): in-plane rotation of the head in degrees, clockwise positive;
        - ``smile`` (bool): the mouth is bent upward and thicker (otherwise flat or slightly down);
        - ``glasses`` (bool): frames around the eyes and a bridge (frame colour varies).

    Examples
    --------
    >>> from sklearn_craft.datasets import make_faces
    >>> images, labels = make_faces(n_samples=8, image_size=32, random_state=0)
    >>> images.shape, images.dtype
    ((8, 32, 32, 3), dtype('uint8'))
    >>> list(labels.columns)
    ['identity', 'male', 'age', 'yaw', 'roll', 'smile', 'glasses']
    """
    height, width = _image_shape(image_size)
    rng = check_random_state(random_state)
    ids = _draw_identities(rng, n_identities)
    n = n_samples

    identity = rng.randint(n_identities, size=n)
    age = np.clip(ids["base_age"][identity] + rng.normal(0, 8, n), 18, 90)
    smile = rng.rand(n) < 0.5
    glasses = rng.rand(n) < 0.35
    yaw = rng.uniform(-max_yaw, max_yaw, n)
    roll = rng.uniform(-10, 10, n)
    params = {key: value[identity] for key, value in ids.items() if key != "base_age"}
    params.update(
        yaw=yaw,
        roll=roll,
        age=age,
        smile=smile.astype(float),
        glasses=glasses.astype(float),
        grey=np.clip((age - 32) / 40, 0, 1) * params.pop("greying"),
        mouth_bend=np.where(smile, rng.uniform(0.06, 0.11, n), rng.uniform(-0.03, 0.01, n)),
        lipstick=(~params["male"]) * rng.uniform(0, 1, n),
        frame=rng.choice([0.05, 0.3, 0.55], n)[:, None] * [1.0, 0.85, 0.7],
        cx=rng.uniform(-0.06, 0.06, n) * (width / height),
        cy=rng.uniform(-0.06, 0.06, n),
        scale=rng.uniform(0.92, 1.08, n),
        light=rng.uniform(0, 1, n),
        light_angle=rng.uniform(-np.pi, np.pi, n),
        brightness=rng.uniform(0.75, 1.15, n),
        background=rng.uniform(0.1, 0.9, (n, 3)),
        bg_gradient=rng.uniform(-1, 1, n),
    )
    params["male"] = params["male"].astype(float)
    params["long_hair"] = params["long_hair"].astype(float)
    params["beard"] = params["beard"].astype(float)

    images = np.empty((n, height, width, 3), dtype=np.uint8)
    for start in range(0, n, _CHUNK):
        block = {key: value[start : start + _CHUNK] for key, value in params.items()}
        images[start : start + _CHUNK] = _render(block, height, width, rng, noise)

    labels = pd.DataFrame(
        {
            "identity": identity.astype(np.int64),
            "male": ids["male"][identity],
            "age": age,
            "yaw": yaw,
            "roll": roll,
            "smile": smile,
            "glasses": glasses,
        }
    )
    return images, labels
