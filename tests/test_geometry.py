import numpy as np
import pytest
from conftest import ORIENTATIONS, make_affine

from medseg.errors import GeometryError
from medseg.io.geometry import Geometry, affine_from_lps, lps_from_affine


@pytest.mark.parametrize("kind", ORIENTATIONS)
def test_lps_ras_conversion_round_trips(kind):
    affine = make_affine(kind)
    direction, spacing, origin = lps_from_affine(affine)
    np.testing.assert_allclose(spacing, [0.8, 1.1, 2.5], atol=1e-12)
    np.testing.assert_allclose(direction.T @ direction, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(affine_from_lps(direction, spacing, origin), affine, atol=1e-12)


def test_lps_origin_flips_x_and_y_only():
    geom = Geometry((4, 5, 6), make_affine("RAS", origin=(10.0, -20.0, 30.0)))
    assert geom.origin_lps == (-10.0, 20.0, 30.0)
    np.testing.assert_allclose(geom.direction_lps, np.diag([-1.0, -1.0, 1.0]))


@pytest.mark.parametrize(("kind", "code"), [("RAS", "RAS"), ("LPS", "LPS"), ("PIR", "PIR")])
def test_orientation_codes_name_axis_directions(kind, code):
    assert Geometry((4, 5, 6), make_affine(kind)).orientation == code


def test_corners_detect_a_one_voxel_shift():
    a = Geometry((10, 10, 10), make_affine("oblique"))
    shifted = make_affine("oblique")
    shifted[:3, 3] += shifted[:3, 0]  # one voxel along i
    b = Geometry((10, 10, 10), shifted)
    assert a.same_grid(a)
    assert not a.same_grid(b)
    assert a.max_corner_distance(b) == pytest.approx(0.8, abs=1e-9)
    assert "origin" in a.describe_difference(b)


def test_geometry_to_dict_round_trips():
    geom = Geometry((7, 8, 9), make_affine("left_handed"), source="nifti")
    again = Geometry.from_dict(geom.to_dict())
    assert again.same_grid(geom, atol_mm=0.0) and again.source == "nifti"


def test_singular_affine_is_refused():
    affine = np.eye(4)
    affine[:3, 1] = affine[:3, 0]
    with pytest.raises(GeometryError, match="affine is singular"):
        Geometry((3, 3, 3), affine)
