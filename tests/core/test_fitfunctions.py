"""Background densities: formulas, nesting, log-space stability and Gauss-Legendre bin integrals."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import integrate

from core.errors import InvalidInputError
from core.fitfunctions import (
    FUNCTIONS,
    NESTED_FAMILY,
    BackgroundFunction,
    bin_integrals,
    gauss_legendre_nodes,
    get_function,
    log_bin_integrals,
    nested_start,
)
from tests.spectra import SQRT_S, resolution_edges


def test_resolution_binning_has_178_bins():
    edges = resolution_edges()
    assert edges.size - 1 == 178
    assert edges[-1] == pytest.approx(13093.0, abs=1.0)


@pytest.mark.parametrize(
    ("name", "params", "formula"),
    [
        ("p2", [2.0, -4.5], lambda x, p: p[0] * x ** p[1]),
        ("p3", [2.0, 9.0, -4.0], lambda x, p: p[0] * (1 - x) ** p[1] * x ** p[2]),
        (
            "p4",
            [2.0, 9.0, -4.0, -0.3],
            lambda x, p: p[0] * (1 - x) ** p[1] * x ** (p[2] + p[3] * np.log(x)),
        ),
        (
            "p5",
            [2.0, 9.0, -4.0, -0.3, 0.02],
            lambda x, p: (
                p[0] * (1 - x) ** p[1] * x ** (p[2] + p[3] * np.log(x) + p[4] * np.log(x) ** 2)
            ),
        ),
        (
            "p6",
            [2.0, 9.0, -4.0, -0.3, 0.02, 0.001],
            lambda x, p: (
                p[0]
                * (1 - x) ** p[1]
                * x ** (p[2] + p[3] * np.log(x) + p[4] * np.log(x) ** 2 + p[5] * np.log(x) ** 3)
            ),
        ),
        (
            "ua2",
            [2.0, 4.0, 10.0, 3.0],
            lambda x, p: p[0] * x ** -p[1] * np.exp(-p[2] * x - p[3] * x**2),
        ),
        (
            "ua2_5",
            [2.0, 4.0, 10.0, 3.0, -1.0],
            lambda x, p: p[0] * x ** -p[1] * np.exp(-p[2] * x - p[3] * x**2 - p[4] * x**3),
        ),
    ],
)
def test_density_matches_physics_formula(name, params, formula):
    x = np.array([0.003, 0.05, 0.3, 0.9])
    function = get_function(name)
    np.testing.assert_allclose(
        # parameter vectors carry ln p1 in place of p1
        function.density(x, [math.log(params[0]), *params[1:]]),
        formula(x, np.array(params)),
        rtol=1e-12,
    )
    assert function.n_params == len(params)


def test_family_is_nested_each_function_contains_the_previous():
    x = np.linspace(0.01, 0.95, 50)
    for lower_name, higher_name in itertools.pairwise(NESTED_FAMILY):
        lower, higher = get_function(lower_name), get_function(higher_name)
        theta = np.arange(1, lower.n_params) * 0.7 - 3.0
        embedded = nested_start(lower, theta, higher)
        assert embedded is not None
        assert higher.n_params == lower.n_params + 1
        np.testing.assert_allclose(
            higher.log_shape(x, embedded), lower.log_shape(x, theta), rtol=1e-13, atol=1e-13
        )
    assert nested_start(get_function("p4"), [1.0, 2.0, 3.0], get_function("ua2")) is None


def test_p2_bin_integral_matches_analytic_integral():
    edges = resolution_edges()
    params = np.array([3.0e-4, -4.7])
    p1, power = params
    x = edges / SQRT_S
    analytic = p1 * SQRT_S / (power + 1) * np.diff(np.minimum(x, 1.0) ** (power + 1))
    np.testing.assert_allclose(
        bin_integrals(get_function("p2"), [math.log(p1), power], edges), analytic, rtol=1e-12
    )


@pytest.mark.parametrize("name", ["p4", "p6", "ua2"])
def test_bin_integrals_match_adaptive_quadrature(name):
    function = get_function(name)
    params = {
        "p4": [1.0, 12.0, -5.0, -0.4],
        "p6": [1.0, 12.0, -5.0, -0.4, -0.03, 0.002],
        "ua2": [1.0, 5.0, 20.0, -4.0],
    }[name]
    edges = resolution_edges()[::15]
    numeric = [
        integrate.quad(
            lambda m: function.density(m / SQRT_S, params), lo, min(hi, SQRT_S), epsrel=1e-12
        )[0]
        for lo, hi in itertools.pairwise(edges)
    ]
    np.testing.assert_allclose(
        bin_integrals(function, params, edges, n_points=24), numeric, rtol=1e-10
    )
    # the default 6 points reach 5e-6 on the resolution binning (worst: the bin at sqrt_s)
    fine = resolution_edges()
    reference = bin_integrals(function, params, fine, n_points=16)
    np.testing.assert_allclose(bin_integrals(function, params, fine), reference, rtol=5e-6)


def test_log_space_evaluation_neither_overflows_nor_takes_log_of_zero():
    function = get_function("p6")
    params = [1.0, 300.0, -250.0, -30.0, -3.0, -0.2]
    x = np.array([1e-6, 0.5, 1 - 1e-12])
    with np.errstate(over="raise", divide="raise", invalid="raise"):
        log_f = function.log_density(x, params)
        log_mu = log_bin_integrals(function, params, resolution_edges())
    assert np.all(np.isfinite(log_f))
    assert np.all(np.isfinite(log_mu[:-1]))
    assert log_mu.max() > 700  # exp would overflow: the log is the only usable form


def test_bins_above_sqrt_s_are_clipped_at_the_kinematic_limit():
    edges = np.array([12000.0, 12900.0, 13100.0, 13500.0])
    params = np.array([0.0, -3.0])  # p1 = 1
    log_mu = log_bin_integrals(get_function("p2"), params, edges)
    assert log_mu[2] == -np.inf
    analytic = SQRT_S / (-2.0) * ((1.0) ** -2 - (12900 / SQRT_S) ** -2)
    assert np.exp(log_mu[1]) == pytest.approx(analytic, rel=1e-12)
    nodes, weights = gauss_legendre_nodes(edges, SQRT_S)
    assert np.all(nodes[:2] < 1) and np.all(weights[2] == 0)


def test_custom_shape_plugs_in_like_a_symbolic_expression():
    p4 = get_function("p4")

    def log_shape(x, theta):
        return theta[0] * np.log1p(-x) + (theta[1] + theta[2] * np.log(x)) * np.log(x)

    custom = BackgroundFunction(
        name="(1-x)^a x^(b + c ln x)",
        parameter_names=("p1", "a", "b", "c"),
        formula="p1 (1-x)^a x^(b + c ln x)",
        start=(10.0, -5.0, 0.0),
        shape=log_shape,
    )
    params = [2.0, 9.0, -4.0, -0.3]
    edges = resolution_edges()
    assert not custom.is_log_linear
    np.testing.assert_allclose(
        bin_integrals(custom, params, edges), bin_integrals(p4, params, edges), rtol=1e-13
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"parameter_names": ("p1",), "start": (), "terms": ()}, "at least one shape"),
        ({"terms": ("ln x", "ln(1-x)")}, "must match one to one"),
        ({"terms": ("sin x",)}, "unknown terms"),
        ({"terms": ("ln x",), "start": (1.0, 2.0)}, "start values"),
        ({"terms": (), "shape": None}, "exactly one"),
    ],
)
def test_bad_function_definitions_are_rejected(kwargs, match):
    base = {
        "name": "bad",
        "parameter_names": ("p1", "p2"),
        "formula": "",
        "start": (1.0,),
        "terms": ("ln x",),
    }
    base.update(kwargs)
    with pytest.raises(InvalidInputError, match=match):
        BackgroundFunction(**base)


def test_bad_evaluation_inputs_raise_clear_errors():
    p3 = get_function("p3")
    with pytest.raises(InvalidInputError, match=r"\(0, 1\)"):
        p3.density([0.5, 1.0], [1.0, 1.0, 1.0])
    with pytest.raises(InvalidInputError, match=r"\(0, 1\)"):
        p3.density([0.0], [1.0, 1.0, 1.0])
    with pytest.raises(InvalidInputError, match="takes 3 parameters"):
        p3.density([0.5], [1.0, 1.0])
    with pytest.raises(InvalidInputError, match="must be finite"):
        p3.density([0.5], [np.nan, 1.0, 1.0])
    with pytest.raises(InvalidInputError, match="must be finite"):
        bin_integrals(p3, [-np.inf, 1.0, 1.0], [100.0, 200.0])
    with pytest.raises(InvalidInputError, match="takes 3 parameters"):
        bin_integrals(p3, [1.0, 1.0], [100.0, 200.0])
    with pytest.raises(InvalidInputError, match="unknown background function"):
        get_function("p7")
    with pytest.raises(InvalidInputError, match="not log-linear"):
        BackgroundFunction("s", ("p1", "a"), "", (1.0,), shape=lambda x, t: x).log_features(
            np.ones(2)
        )
    with pytest.raises(InvalidInputError, match="increase strictly"):
        gauss_legendre_nodes([100.0, 90.0], SQRT_S)
    with pytest.raises(InvalidInputError, match="positive"):
        gauss_legendre_nodes([-1.0, 90.0], SQRT_S)
    with pytest.raises(InvalidInputError, match="two bin edges"):
        gauss_legendre_nodes([100.0], SQRT_S)
    with pytest.raises(InvalidInputError, match="Gauss-Legendre"):
        gauss_legendre_nodes([100.0, 200.0], SQRT_S, n_points=0)
    with pytest.raises(InvalidInputError, match="sqrt_s"):
        gauss_legendre_nodes([100.0, 200.0], 0.0)


def test_parameter_vectors_name_ln_p1_first():
    assert get_function("p4").vector_names == ("ln p1", "p2", "p3", "p4")
    assert get_function("p4").parameter_names == ("p1", "p2", "p3", "p4")


def test_registry_names_match_functions():
    assert set(NESTED_FAMILY) <= set(FUNCTIONS)
    assert all(FUNCTIONS[name].name == name for name in FUNCTIONS)
    assert [FUNCTIONS[name].n_params for name in NESTED_FAMILY] == [2, 3, 4, 5, 6]
