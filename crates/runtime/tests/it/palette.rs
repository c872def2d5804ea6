//! The palette schemes: clustered weights stored as a codebook and packed indices
//! (`palette`), or with their exact zeros left out (`palette_sparse`), decoded exactly at load
//! and run by the f32 kernels; every fault in the streams is an error that names it.

use std::collections::BTreeMap;

use model_spec::{LayerSpec, NetworkSpec};
use proptest::prelude::*;
use runtime::{
    Artifact, ArtifactBuilder, Encoded, Error, Execution, Granularity, MAX_SPARSE_ELEMENTS, Model,
    PositionCode, QParams, Scheme, Storage, WeightValues, palette_index_bits,
};
use safetensors::Dtype;

use crate::common::{Rng, edit_file, edit_metadata, images, params};

/// Flatten and one linear layer of `out x in` weights.
fn linear(out: usize, inputs: usize) -> NetworkSpec {
    NetworkSpec {
        name: "palette".into(),
        input: [1, 1, inputs],
        layers: vec![
            LayerSpec::Flatten,
            LayerSpec::Linear {
                in_features: inputs,
                out_features: out,
            },
        ],
    }
}

/// A palettized weight as a clustering library would hand it over.
#[derive(Clone, Debug)]
struct Clustered {
    indices: Vec<u8>,
    codebook: Vec<f32>,
    clusters: usize,
    granularity: Granularity,
    kept: Option<Vec<bool>>,
}

impl Clustered {
    /// Seeded indices below `clusters`, a codebook of distinct non-zero centroids per group,
    /// and, when `density` is given, that fraction of the elements kept.
    fn random(
        shape: [usize; 2],
        clusters: usize,
        granularity: Granularity,
        density: Option<f32>,
        seed: u64,
    ) -> Self {
        let mut rng = Rng::new(seed);
        let groups = match granularity {
            Granularity::PerTensor => 1,
            Granularity::PerChannel => shape[0],
        };
        let codebook = (0..groups * clusters)
            .map(|i| {
                let c = (i % clusters) as f32 * 0.125 + 0.0625 + rng.uniform() * 1e-3;
                if rng.uniform() < 0.0 { -c } else { c }
            })
            .collect();
        let numel = shape[0] * shape[1];
        let indices = (0..numel)
            .map(|_| {
                (((rng.uniform() + 1.0) / 2.0 * clusters as f32) as usize).min(clusters - 1) as u8
            })
            .collect();
        let kept = density.map(|d| {
            (0..numel)
                .map(|_| (rng.uniform() + 1.0) / 2.0 < d)
                .collect()
        });
        Self {
            indices,
            codebook,
            clusters,
            granularity,
            kept,
        }
    }

    fn encoded(&self) -> Encoded<'_> {
        Encoded::Palette {
            indices: &self.indices,
            codebook: &self.codebook,
            granularity: self.granularity,
            kept: self.kept.as_deref(),
            half_codebook: false,
        }
    }

    /// The scalar reference decode, as `docs/FORMAT.md` defines the values: element `i` is
    /// its group's codebook entry at its index, or 0 where it is not kept.
    fn values(&self, per_group: usize) -> Vec<f32> {
        (0..self.indices.len())
            .map(|i| {
                let kept = self.kept.as_ref().is_none_or(|k| k[i]);
                let group = match self.granularity {
                    Granularity::PerTensor => 0,
                    Granularity::PerChannel => i / per_group,
                };
                if kept {
                    self.codebook[group * self.clusters + usize::from(self.indices[i])]
                } else {
                    0.0
                }
            })
            .collect()
    }
}

/// The artifact of `linear(out, in)` with `weight` as its weight.
fn artifact_of(shape: [usize; 2], weight: Encoded<'_>) -> Vec<u8> {
    let mut b = ArtifactBuilder::new(linear(shape[0], shape[1]));
    b.add_encoded("1.weight", &shape, weight).unwrap();
    b.add("1.bias", &vec![0.25; shape[0]], &[shape[0]], Storage::F32)
        .unwrap();
    b.to_bytes().unwrap()
}

/// The decoded weight of layer 1, with its scheme.
fn decoded(bytes: &[u8]) -> (Scheme, Vec<f32>) {
    let view = Artifact::from_bytes(bytes).unwrap();
    let layer = view.layer(1).unwrap();
    let WeightValues::Float(values) = &layer.weight else {
        panic!("palette weights decode to real values: {:?}", layer.weight);
    };
    (layer.weight_scheme.clone(), values.clone())
}

fn bits_of(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

fn err(bytes: &[u8]) -> (Error, String) {
    let e = Model::from_bytes(bytes).unwrap_err();
    let s = e.to_string();
    // The two loaders are one decoder: they refuse the same files.
    assert_eq!(Artifact::from_bytes(bytes).unwrap_err().to_string(), s);
    (e, s)
}

#[test]
fn every_granularity_width_and_variant_round_trips_exactly() {
    let shape = [24, 40];
    for granularity in [Granularity::PerTensor, Granularity::PerChannel] {
        for clusters in [2, 3, 16, 256] {
            for density in [None, Some(0.1), Some(0.6)] {
                let seed = clusters as u64 * 7 + density.map_or(0, |d| (d * 10.0) as u64);
                let c = Clustered::random(shape, clusters, granularity, density, seed);
                let bytes = artifact_of(shape, c.encoded());
                let (scheme, values) = decoded(&bytes);
                let case = format!("{granularity:?}, k = {clusters}, density {density:?}");
                assert_eq!(bits_of(&values), bits_of(&c.values(shape[1])), "{case}");
                let bits = palette_index_bits(clusters).unwrap();
                match (density, scheme) {
                    (
                        None,
                        Scheme::Palette {
                            granularity: g,
                            bits: b,
                        },
                    ) => {
                        assert_eq!((g, b), (granularity, bits), "{case}");
                    }
                    (
                        Some(d),
                        Scheme::PaletteSparse {
                            granularity: g,
                            bits: b,
                            positions,
                        },
                    ) => {
                        assert_eq!((g, b), (granularity, bits), "{case}");
                        // Rice beats the bitmask when few elements are kept, not when most are.
                        let rice = matches!(positions, PositionCode::Rice { .. });
                        assert_eq!(rice, d < 0.5, "{case}: {positions:?}");
                    }
                    (_, other) => panic!("{case}: stored as {other:?}"),
                }
                // The engine runs what the view decodes.
                let model = Model::from_bytes(&bytes).unwrap();
                assert_eq!(model.weight_scheme(1), Some(&decoded(&bytes).0));
                assert_eq!(model.weight_scheme(0), None);
            }
        }
    }
}

#[test]
fn clustered_values_are_palettized_exactly() {
    // Five distinct values per row (each row its own five), none of them zero.
    let shape = [16, 64];
    let mut rng = Rng::new(3);
    let centroids = [-0.75f32, -0.3, 0.2, 0.5, 1.25];
    let values: Vec<f32> = (0..shape[0] * shape[1])
        .map(|i| {
            centroids[((rng.uniform() + 1.0) * 2.5) as usize % 5] + (i / shape[1]) as f32 / 64.0
        })
        .collect();
    for granularity in [Granularity::PerTensor, Granularity::PerChannel] {
        let mut b = ArtifactBuilder::new(linear(shape[0], shape[1]));
        b.add_layer(1, &values, &[0.0; 16], Storage::Palette(granularity))
            .unwrap();
        let bytes = b.to_bytes().unwrap();
        let (scheme, decoded) = decoded(&bytes);
        assert_eq!(bits_of(&decoded), bits_of(&values), "{granularity:?}");
        // Without zeros the sparse variant would only add its positions. Per channel, five
        // values need 3 bits; per tensor, the 16 rows' 80 values need 7.
        let bits = match granularity {
            Granularity::PerChannel => 3,
            Granularity::PerTensor => 7,
        };
        assert_eq!(scheme, Scheme::Palette { granularity, bits });
    }
    // Pruned to 90 %: the sparse palette is smaller.
    let pruned: Vec<f32> = values
        .iter()
        .enumerate()
        .map(|(i, &v)| if i % 10 == 3 { v } else { 0.0 })
        .collect();
    let mut b = ArtifactBuilder::new(linear(shape[0], shape[1]));
    b.add_layer(
        1,
        &pruned,
        &[0.0; 16],
        Storage::Palette(Granularity::PerChannel),
    )
    .unwrap();
    let bytes = b.to_bytes().unwrap();
    let (scheme, decoded) = decoded(&bytes);
    assert_eq!(bits_of(&decoded), bits_of(&pruned));
    let Scheme::PaletteSparse {
        bits, positions, ..
    } = scheme
    else {
        panic!("{scheme:?}");
    };
    assert!(
        matches!(positions, PositionCode::Rice { .. }),
        "{positions:?}"
    );
    // The dense palette of the same values holds zero as one more cluster: larger.
    let sparse_size: usize = stored_bytes(&bytes, "1.weight").values().sum();
    let rows: Vec<Vec<f32>> = pruned
        .chunks(shape[1])
        .map(|row| {
            let mut distinct = row.to_vec();
            distinct.sort_by(f32::total_cmp);
            distinct.dedup();
            distinct.resize(6, 0.0);
            distinct
        })
        .collect();
    let indices: Vec<u8> = pruned
        .iter()
        .enumerate()
        .map(|(i, v)| rows[i / shape[1]].iter().position(|c| c == v).unwrap() as u8)
        .collect();
    let dense = artifact_of(
        shape,
        Encoded::Palette {
            indices: &indices,
            codebook: &rows.concat(),
            granularity: Granularity::PerChannel,
            kept: None,
            half_codebook: false,
        },
    );
    assert_eq!(bits_of(&decoded_weights(&dense)), bits_of(&pruned));
    // The sparse codebook leaves zero out: as wide as the largest row's non-zero values need.
    let nonzero = rows.iter().map(|r| r.iter().filter(|&&c| c != 0.0).count());
    assert_eq!(Some(bits), palette_index_bits(nonzero.max().unwrap()));
    let dense_size: usize = stored_bytes(&dense, "1.weight").values().sum();
    assert!(
        sparse_size < dense_size,
        "{sparse_size} against {dense_size}"
    );
}

fn decoded_weights(bytes: &[u8]) -> Vec<f32> {
    decoded(bytes).1
}

#[test]
fn half_codebooks_hold_the_centroids_rounded_to_f16() {
    // Centroids that f16 cannot hold exactly, 90 % of the weights pruned.
    let shape = [16, 64];
    let centroids = [-0.6543f32, -0.1234567, 0.333_333_3, 1.000_123];
    let values: Vec<f32> = (0..shape[0] * shape[1])
        .map(|i| {
            if i % 10 == 0 {
                centroids[i / 10 % 4]
            } else {
                0.0
            }
        })
        .collect();
    let bias: Vec<f32> = (0..shape[0]).map(|i| i as f32 / 3.0).collect();
    let build = |storage| {
        let mut b = ArtifactBuilder::new(linear(shape[0], shape[1]));
        b.add_layer(1, &values, &bias, storage).unwrap();
        b.to_bytes().unwrap()
    };
    let full = build(Storage::Palette(Granularity::PerTensor));
    let half = build(Storage::PaletteHalf(Granularity::PerTensor));
    let rounded =
        |v: &[f32]| -> Vec<f32> { v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect() };
    let (scheme, decoded_half) = decoded(&half);
    assert!(
        matches!(scheme, Scheme::PaletteSparse { bits: 2, .. }),
        "{scheme:?}"
    );
    assert_eq!(bits_of(&decoded_half), bits_of(&rounded(&values)));
    assert_ne!(bits_of(&decoded_half), bits_of(&values));
    assert_eq!(bits_of(&decoded(&full).1), bits_of(&values));
    let view = Artifact::from_bytes(&half).unwrap();
    assert_eq!(
        bits_of(&view.layer(1).unwrap().bias),
        bits_of(&rounded(&bias))
    );
    // The codebook and the bias in two bytes a value instead of four.
    let (full_sizes, half_sizes) = (stored_bytes(&full, "1"), stored_bytes(&half, "1"));
    assert_eq!(full_sizes["1.weight.codebook"], 16);
    assert_eq!(half_sizes["1.weight.codebook"], 8);
    assert_eq!(half_sizes["1.bias"], 32);
    assert_eq!(
        half_sizes["1.weight.indices"],
        full_sizes["1.weight.indices"]
    );
    // Run, the half artifact computes what a full one of the rounded values does.
    let mut b = ArtifactBuilder::new(linear(shape[0], shape[1]));
    b.add_layer(
        1,
        &rounded(&values),
        &rounded(&bias),
        Storage::Palette(Granularity::PerTensor),
    )
    .unwrap();
    let x = images(3, &linear(shape[0], shape[1]), 7);
    let expected = Model::from_bytes(&b.to_bytes().unwrap())
        .unwrap()
        .run(x.view())
        .unwrap();
    let got = Model::from_bytes(&half).unwrap().run(x.view()).unwrap();
    assert_eq!(got, expected);
    // A centroid beyond f16's range is the builder's error, not an infinite weight.
    let huge: Vec<f32> = values.iter().map(|v| v * 1e6).collect();
    let mut b = ArtifactBuilder::new(linear(shape[0], shape[1]));
    let Error::Builder { reason } = b
        .add_layer(
            1,
            &huge,
            &bias,
            Storage::PaletteHalf(Granularity::PerTensor),
        )
        .unwrap_err()
    else {
        panic!("a builder error");
    };
    assert!(reason.contains("beyond half precision's range"), "{reason}");
}

#[test]
fn the_builder_refuses_what_a_palette_cannot_hold() {
    let shape = [2, 300];
    let spread: Vec<f32> = (0..600).map(|i| i as f32 / 8.0).collect();
    let mut b = ArtifactBuilder::new(linear(2, 300));
    let Error::Builder { reason } = b
        .add(
            "1.weight",
            &spread,
            &shape,
            Storage::Palette(Granularity::PerChannel),
        )
        .unwrap_err()
    else {
        panic!("a builder error");
    };
    assert!(
        reason.contains("group 0 has 300 distinct values, a palette holds at most 256"),
        "{reason}"
    );
    // Per channel, 257 values of which one is zero: too many for `palette`, but
    // `palette_sparse` leaves the zero out.
    let mut row: Vec<f32> = (0..300).map(|i| (i % 257) as f32).collect();
    row.extend_from_slice(&row.clone());
    b.add(
        "1.weight",
        &row,
        &shape,
        Storage::Palette(Granularity::PerChannel),
    )
    .unwrap();
    let (scheme, values) = decoded(&{
        b.add("1.bias", &[0.0; 2], &[2], Storage::F32).unwrap();
        b.to_bytes().unwrap()
    });
    assert!(
        matches!(scheme, Scheme::PaletteSparse { bits: 8, .. }),
        "{scheme:?}"
    );
    assert_eq!(bits_of(&values), bits_of(&row));

    let mut nan = vec![0.5f32; 600];
    nan[7] = f32::NAN;
    let e = ArtifactBuilder::new(linear(2, 300))
        .add(
            "1.weight",
            &nan,
            &shape,
            Storage::Palette(Granularity::PerTensor),
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("value 7 is NaN, a palette stores finite values"),
        "{e}"
    );

    let indices = [0u8; 600];
    let uneven = Encoded::Palette {
        indices: &indices,
        codebook: &[0.5; 5],
        granularity: Granularity::PerChannel,
        kept: None,
        half_codebook: false,
    };
    let e = ArtifactBuilder::new(linear(2, 300))
        .add_encoded("1.weight", &shape, uneven)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("a codebook of 5 values is not 2 rows of 1 to 256 clusters"),
        "{e}"
    );
    let mut wide = indices;
    wide[9] = 4;
    let e = ArtifactBuilder::new(linear(2, 300))
        .add_encoded(
            "1.weight",
            &shape,
            Encoded::Palette {
                indices: &wide,
                codebook: &[0.5, 1.0, 2.0],
                granularity: Granularity::PerTensor,
                kept: None,
                half_codebook: false,
            },
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("index 4 of element 9 does not fit the 2 bits"),
        "{e}"
    );
}

/// LSB-first bit stream writer following `docs/FORMAT.md`, independent of the runtime's.
#[derive(Default)]
struct Stream {
    bits: Vec<bool>,
}

impl Stream {
    fn field(&mut self, value: u64, width: u8) {
        self.bits.extend((0..width).map(|j| value >> j & 1 == 1));
    }

    /// The Rice code of `positions` among `numel` elements, as the format states it.
    fn rice(positions: &[usize], numel: usize, parameter: u8) -> Self {
        let mut s = Self::default();
        let mut next = 0;
        for p in positions.iter().copied().chain([numel]) {
            let gap = (p - next) as u64;
            s.bits
                .extend(std::iter::repeat_n(true, (gap >> parameter) as usize));
            s.bits.push(false);
            s.field(gap, parameter);
            next = p + 1;
        }
        s
    }

    fn bytes(&self) -> Vec<u8> {
        self.bits
            .chunks(8)
            .map(|c| c.iter().enumerate().map(|(j, &b)| u8::from(b) << j).sum())
            .collect()
    }
}

#[test]
fn the_streams_are_the_ones_the_format_specifies() {
    let shape = [20, 50];
    let c = Clustered::random(shape, 5, Granularity::PerChannel, Some(0.08), 21);
    let bytes = artifact_of(shape, c.encoded());
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let schemes: BTreeMap<String, serde_json::Value> =
        serde_json::from_str(&meta.metadata().as_ref().unwrap()["tensors"]).unwrap();
    let entry = &schemes["1.weight"];
    assert_eq!(entry["scheme"], "palette_sparse");
    assert_eq!(entry["granularity"], "per_channel");
    assert_eq!(entry["bits"], 3);
    assert_eq!(entry["positions"]["code"], "rice");
    let parameter = entry["positions"]["parameter"].as_u64().unwrap() as u8;

    let kept = c.kept.as_ref().unwrap();
    let positions: Vec<usize> = (0..kept.len()).filter(|&i| kept[i]).collect();
    let mut indices = Stream::default();
    for &p in &positions {
        indices.field(u64::from(c.indices[p]), 3);
    }
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let tensor = |name: &str| st.tensor(name).unwrap().data().to_vec();
    assert_eq!(tensor("1.weight.indices"), indices.bytes());
    assert_eq!(
        tensor("1.weight.positions"),
        Stream::rice(&positions, kept.len(), parameter).bytes()
    );
    // The writer's parameter gives the shortest code.
    for other in 0..=31 {
        assert!(
            Stream::rice(&positions, kept.len(), other).bits.len()
                >= Stream::rice(&positions, kept.len(), parameter).bits.len()
        );
    }
    let codebook: Vec<f32> = tensor("1.weight.codebook")
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(st.tensor("1.weight.codebook").unwrap().shape(), [20, 5]);
    assert_eq!(codebook, c.codebook);
}

/// A valid artifact to break: `linear(6, 20)` with a palette weight; the variant, the
/// granularity and the codebook size chosen by the caller.
fn breakable(clusters: usize, density: Option<f32>) -> Vec<u8> {
    let c = Clustered::random([6, 20], clusters, Granularity::PerChannel, density, 5);
    let bytes = artifact_of([6, 20], c.encoded());
    Model::from_bytes(&bytes).unwrap();
    bytes
}

fn set_scheme(bytes: &[u8], edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    edit_metadata(bytes, |m| {
        let mut schemes: serde_json::Value = serde_json::from_str(&m["tensors"]).unwrap();
        edit(&mut schemes["1.weight"]);
        m.insert("tensors".into(), schemes.to_string());
    })
}

type Tensor = (Dtype, Vec<usize>, Vec<u8>);

fn set_tensor(bytes: &[u8], name: &str, edit: impl FnOnce(&mut Tensor)) -> Vec<u8> {
    edit_file(bytes, |_, t| edit(t.get_mut(name).unwrap()))
}

#[test]
fn truncated_or_padded_indices_are_errors() {
    // 120 indices of 3 bits: exactly 45 bytes.
    let dense = breakable(5, None);
    let (e, s) = err(&set_tensor(&dense, "1.weight.indices", |t| {
        t.1 = vec![44];
        t.2.pop();
    }));
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{s}");
    assert!(
        s.contains("`1.weight.indices` has shape [44], expected [45]"),
        "{s}"
    );
    // 7 x 20 indices of 3 bits: 420 bits in 53 bytes, the last with 4 padding bits.
    let c = Clustered::random([7, 20], 5, Granularity::PerTensor, None, 8);
    let odd = artifact_of([7, 20], c.encoded());
    let (e, s) = err(&set_tensor(&odd, "1.weight.indices", |t| {
        *t.2.last_mut().unwrap() |= 0x80;
    }));
    assert!(matches!(e, Error::InvalidTensor { .. }), "{s}");
    assert!(
        s.contains("`1.weight.indices` is invalid: padding bits after the indices are set"),
        "{s}"
    );
}

#[test]
fn an_index_beyond_the_codebook_is_an_error() {
    // Three clusters take 2 bits, so index 3 can be written; the loader refuses it.
    let mut c = Clustered::random([6, 20], 3, Granularity::PerTensor, None, 9);
    c.indices[17] = 3;
    let (e, s) = err(&artifact_of([6, 20], c.encoded()));
    assert!(matches!(e, Error::InvalidTensor { .. }), "{s}");
    assert!(
        s.contains("`1.weight.indices` is invalid: index 17 is 3, beyond the codebook's 3 entries"),
        "{s}"
    );
    // In the sparse variant the index counts stored elements.
    let mut c = Clustered::random([6, 20], 3, Granularity::PerChannel, Some(0.5), 9);
    let kept = c.kept.clone().unwrap();
    let third = (0..kept.len()).filter(|&i| kept[i]).nth(2).unwrap();
    c.indices[third] = 3;
    let (_, s) = err(&artifact_of([6, 20], c.encoded()));
    assert!(
        s.contains("index 2 is 3, beyond the codebook's 3 entries"),
        "{s}"
    );
}

#[test]
fn bits_must_match_the_codebook() {
    let dense = breakable(16, None);
    for (bits, needle) in [
        (
            3,
            "`1.weight` has bits 3, but its codebook of 16 entries per group needs 4",
        ),
        (
            5,
            "`1.weight` has bits 5, but its codebook of 16 entries per group needs 4",
        ),
        (0, "`1.weight`: bits 0 is not in 1..=8"),
        (9, "`1.weight`: bits 9 is not in 1..=8"),
    ] {
        let (e, s) = err(&set_scheme(&dense, |w| w["bits"] = bits.into()));
        assert!(
            matches!(e, Error::MalformedMetadata { key: "tensors", .. }),
            "{s}"
        );
        assert!(s.contains(needle), "{s}");
    }
    let (e, s) = err(&set_scheme(&dense, |w| w["bits"] = 300.into()));
    assert!(
        matches!(e, Error::MalformedMetadata { key: "tensors", .. }),
        "{s}"
    );
    // A codebook row of 300 entries or of none is not a codebook.
    for clusters in [0usize, 300] {
        let (e, s) = err(&set_tensor(&dense, "1.weight.codebook", |t| {
            t.1 = vec![6, clusters];
            t.2 = vec![0; 6 * clusters * 4];
        }));
        assert!(matches!(e, Error::InvalidTensor { .. }), "{s}");
        assert!(
            s.contains(&format!(
                "has {clusters} entries per group, a codebook has 1 to 256"
            )),
            "{s}"
        );
    }
    // Per channel: one row per output channel.
    let (e, s) = err(&set_tensor(&dense, "1.weight.codebook", |t| {
        t.1 = vec![1, 96];
    }));
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{s}");
    let (e, s) = err(&set_tensor(&dense, "1.weight.codebook", |t| t.1 = vec![96]));
    assert!(matches!(e, Error::InvalidTensor { .. }), "{s}");
    assert!(
        s.contains("has shape [96], a codebook is [groups, clusters]"),
        "{s}"
    );
}

#[test]
fn codebooks_must_be_finite() {
    for bytes in [breakable(16, None), breakable(16, Some(0.2))] {
        for (value, shown) in [
            (f32::NAN, "NaN"),
            (f32::INFINITY, "inf"),
            (f32::NEG_INFINITY, "-inf"),
        ] {
            let (e, s) = err(&set_tensor(&bytes, "1.weight.codebook", |t| {
                // Group 1, entry 3.
                t.2[(16 + 3) * 4..(16 + 4) * 4].copy_from_slice(&value.to_le_bytes());
            }));
            assert!(matches!(e, Error::InvalidTensor { .. }), "{s}");
            assert!(
                s.contains(&format!(
                    "`1.weight.codebook` is invalid: entry 3 of group 1 is {shown}, not finite"
                )),
                "{s}"
            );
        }
    }
}

#[test]
fn rice_streams_must_end_exactly_at_the_last_element() {
    let sparse = breakable(4, Some(0.1));
    let (_, meta) = safetensors::SafeTensors::read_metadata(&sparse).unwrap();
    let schemes: serde_json::Value =
        serde_json::from_str(&meta.metadata().as_ref().unwrap()["tensors"]).unwrap();
    assert_eq!(schemes["1.weight"]["positions"]["code"], "rice");
    let parameter = schemes["1.weight"]["positions"]["parameter"]
        .as_u64()
        .unwrap() as u8;
    let replace = |code: Stream| {
        set_tensor(&sparse, "1.weight.positions", move |t| {
            t.2 = code.bytes();
            t.1 = vec![t.2.len()];
        })
    };
    let invalid = |bytes: Vec<u8>, needle: &str| {
        let (e, s) = err(&bytes);
        assert!(matches!(e, Error::InvalidTensor { .. }), "{s}");
        assert!(s.contains("`1.weight.positions` is invalid"), "{s}");
        assert!(s.contains(needle), "{needle}: {s}");
    };
    // Overrun: the last gap runs past the 120 elements.
    invalid(
        replace(Stream::rice(&[5, 50], 121, parameter)),
        "runs past the 120 elements",
    );
    // A quotient no gap can have: a stream of ones.
    invalid(
        replace(Stream {
            bits: vec![true; 256],
        }),
        "gap 0 runs past the 120 elements",
    );
    // Underrun: the stream stops before the final gap reaches element 120.
    let mut short = Stream::rice(&[5, 50], 120, parameter);
    short.bits.truncate(short.bits.len() - 1);
    short.bits.truncate(short.bits.len() / 8 * 8);
    invalid(replace(short), "the code ends after");
    invalid(
        replace(Stream::rice(&[5, 50], 110, parameter)),
        "the code ends after 3 stored positions",
    );
    // A byte after the end, and padding bits set.
    let mut long = Stream::rice(&[5, 50], 120, parameter);
    long.bits
        .resize(long.bits.len().next_multiple_of(8) + 8, false);
    invalid(replace(long), "1 bytes follow the end of the Rice code");
    let mut padded = Stream::rice(&[5, 50], 120, parameter);
    if padded.bits.len().is_multiple_of(8) {
        padded = Stream::rice(&[5, 51], 120, parameter);
    }
    assert_ne!(padded.bits.len() % 8, 0, "a stream with padding bits");
    padded
        .bits
        .resize(padded.bits.len().next_multiple_of(8), true);
    invalid(replace(padded), "padding bits after the Rice code are set");
    // A well-formed replacement loads: two stored elements, two indices.
    let ok = edit_file(&sparse, |_, t| {
        let code = Stream::rice(&[5, 50], 120, parameter).bytes();
        *t.get_mut("1.weight.positions").unwrap() = (Dtype::U8, vec![code.len()], code);
        *t.get_mut("1.weight.indices").unwrap() = (Dtype::U8, vec![1], vec![0b1110]);
    });
    let (_, values) = decoded(&ok);
    assert_eq!(values.iter().filter(|&&v| v != 0.0).count(), 2);
    assert!(values[5] != 0.0 && values[50] != 0.0);
    // The Rice parameter is at most 31.
    let (e, s) = err(&set_scheme(&sparse, |w| {
        w["positions"]["parameter"] = 32.into()
    }));
    assert!(
        matches!(e, Error::MalformedMetadata { key: "tensors", .. }),
        "{s}"
    );
    assert!(s.contains("Rice parameter 32 is above 31"), "{s}");
    let (e, s) = err(&set_scheme(&sparse, |w| {
        w["positions"] = serde_json::json!({"code": "gzip"})
    }));
    assert!(
        matches!(e, Error::MalformedMetadata { key: "tensors", .. }),
        "{s}"
    );
}

#[test]
fn bitmask_positions_are_validated() {
    let sparse = breakable(4, Some(0.7));
    // 120 elements: 15 bytes with no padding; 7 x 20 = 140 elements: 18 bytes, 4 padding.
    let c = Clustered::random([7, 20], 4, Granularity::PerTensor, Some(0.7), 4);
    let padded = artifact_of([7, 20], c.encoded());
    assert!(matches!(
        decoded(&padded).0,
        Scheme::PaletteSparse {
            positions: PositionCode::Bitmask,
            ..
        }
    ));
    let (e, s) = err(&set_tensor(&padded, "1.weight.positions", |t| {
        t.2[17] |= 0x40
    }));
    assert!(matches!(e, Error::InvalidTensor { .. }), "{s}");
    assert!(s.contains("bits past the 140 elements are set"), "{s}");
    // One more stored element: with one byte per index (256 clusters), the indices no
    // longer match their count.
    let wide = breakable(256, Some(0.7));
    let (_, meta) = safetensors::SafeTensors::read_metadata(&wide).unwrap();
    let indices = meta.tensors()["1.weight.indices"].shape[0];
    let (e, s) = err(&set_tensor(&wide, "1.weight.positions", |t| {
        let byte = t.2.iter().position(|&b| b != 0xff).unwrap();
        t.2[byte] |= 1 << t.2[byte].trailing_ones();
    }));
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{s}");
    assert!(
        s.contains(&format!(
            "`1.weight.indices` has shape [{indices}], expected [{}]",
            indices + 1
        )),
        "{s}"
    );
    let (e, s) = err(&set_tensor(&sparse, "1.weight.positions", |t| {
        t.1 = vec![14];
        t.2.pop();
    }));
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{s}");
    assert!(
        s.contains("`1.weight.positions` has shape [14], expected [15]"),
        "{s}"
    );
}

#[test]
fn palette_layers_have_a_size_limit() {
    // A sparse weight declared larger than the limit is refused before its streams are read.
    let sparse = breakable(4, Some(0.1));
    let huge = edit_metadata(&sparse, |m| {
        let inputs = 1 << 14;
        let out = MAX_SPARSE_ELEMENTS / inputs + 1;
        let mut spec = linear(out, inputs);
        spec.input = [1, 128, 128];
        m.insert("network".into(), serde_json::to_string(&spec).unwrap());
    });
    let (e, s) = err(&huge);
    assert!(matches!(e, Error::Unsupported { .. }), "{s}");
    assert!(s.contains("above the limit of 67108864"), "{s}");
    let e = ArtifactBuilder::new(linear(6, 20))
        .add_encoded(
            "1.weight",
            &[4097, 1 << 14],
            Encoded::Palette {
                indices: &vec![0; 4097 << 14],
                codebook: &[1.0],
                granularity: Granularity::PerTensor,
                kept: Some(&vec![false; 4097 << 14]),
                half_codebook: false,
            },
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("palette_sparse holds at most 67108864"), "{e}");
}

#[test]
fn palette_weights_run_like_the_same_weights_in_f32_or_csr() {
    let spec = crate::common::mlp();
    let p = params(&spec, 4);
    let x = images(5, &spec, 6);
    for (density, expect_csr) in [(None, false), (Some(0.1), true), (Some(0.5), false)] {
        let mut palette = ArtifactBuilder::new(spec.clone());
        let mut plain = ArtifactBuilder::new(spec.clone());
        for (&i, param) in &p {
            let c = Clustered::random(
                [param.shape[0], param.shape[1]],
                16,
                Granularity::PerChannel,
                density,
                i as u64,
            );
            let values = c.values(param.shape[1]);
            palette
                .add_encoded(&format!("{i}.weight"), &param.shape, c.encoded())
                .unwrap();
            palette
                .add(
                    &format!("{i}.bias"),
                    &param.bias,
                    &[param.shape[0]],
                    Storage::F32,
                )
                .unwrap();
            let storage = if expect_csr && i != 6 {
                Storage::Csr
            } else {
                Storage::F32
            };
            plain.add_layer(i, &values, &param.bias, storage).unwrap();
        }
        let palette = Model::from_bytes(&palette.to_bytes().unwrap()).unwrap();
        let plain = Model::from_bytes(&plain.to_bytes().unwrap()).unwrap();
        // The same weights through the same kernels: the same logits, bit for bit.
        assert_eq!(
            palette.execution(),
            plain.execution(),
            "density {density:?}"
        );
        assert_eq!(palette.run(x.view()).unwrap(), plain.run(x.view()).unwrap());
        for (layer, execution) in palette.execution() {
            // The 10-class output layer has too few rows for CSR.
            let csr = expect_csr && layer != 6;
            assert_eq!(
                matches!(execution, Execution::Csr { .. }),
                csr,
                "layer {layer}, density {density:?}"
            );
            let scheme = palette.weight_scheme(layer).unwrap().name();
            assert_eq!(
                scheme,
                if density.is_some() {
                    "palette_sparse"
                } else {
                    "palette"
                }
            );
        }
    }
}

#[test]
fn a_dense_palette_with_zero_as_a_cluster_runs_as_csr_where_that_pays_off() {
    // Zero is one of the clusters and nine elements in ten use it.
    let shape = [64, 128];
    let mut c = Clustered::random(shape, 4, Granularity::PerTensor, None, 12);
    c.codebook[0] = 0.0;
    for (i, index) in c.indices.iter_mut().enumerate() {
        if i % 10 != 0 {
            *index = 0;
        }
    }
    let model = Model::from_bytes(&artifact_of(shape, c.encoded())).unwrap();
    let nonzero = c.values(shape[1]).iter().filter(|&&v| v != 0.0).count();
    assert_eq!(model.execution(), [(1, Execution::Csr { nnz: nonzero })]);
}

#[test]
fn schemes_describe_themselves() {
    let scheme = Scheme::PaletteSparse {
        granularity: Granularity::PerChannel,
        bits: 4,
        positions: PositionCode::Rice { parameter: 3 },
    };
    assert_eq!(
        scheme.to_string(),
        "palette_sparse (4-bit indices, per channel, Rice-coded positions (parameter 3))"
    );
    let scheme = Scheme::Palette {
        granularity: Granularity::PerTensor,
        bits: 8,
    };
    assert_eq!(scheme.to_string(), "palette (8-bit indices, per tensor)");
    assert_eq!(
        Scheme::Int8 {
            granularity: Granularity::PerChannel
        }
        .to_string(),
        "int8 (per channel)"
    );
    assert_eq!(Scheme::F16.to_string(), "f16");
}

/// Raw bytes of every tensor of parameter `name` (the weight's own tensors).
fn stored_bytes(bytes: &[u8], name: &str) -> BTreeMap<String, usize> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).unwrap();
    meta.tensors()
        .into_iter()
        .filter(|(n, _)| n == name || n.starts_with(&format!("{name}.")))
        .map(|(n, info)| (n, info.data_offsets.1 - info.data_offsets.0))
        .collect()
}

#[test]
fn sizes_of_a_204800_weight_layer_at_16_clusters() {
    // 400 x 512 weights, 16 clusters per tensor; 90 % sparse: 10 % kept at random.
    let shape = [400, 512];
    let numel = 204_800;
    let dense = Clustered::random(shape, 16, Granularity::PerTensor, None, 1);
    let sparse = Clustered::random(shape, 16, Granularity::PerTensor, Some(0.1), 1);
    let dense_bytes = artifact_of(shape, dense.encoded());
    let sparse_bytes = artifact_of(shape, sparse.encoded());
    let dense_parts = stored_bytes(&dense_bytes, "1.weight");
    let sparse_parts = stored_bytes(&sparse_bytes, "1.weight");
    let total = |parts: &BTreeMap<String, usize>| parts.values().sum::<usize>();
    let kept = sparse.kept.as_ref().unwrap().iter().filter(|&&k| k).count();
    println!("{numel} weights, 16 clusters per tensor");
    println!("f32: {} bytes", numel * 4);
    println!("palette: {dense_parts:?}, {} bytes", total(&dense_parts));
    println!(
        "palette_sparse, {kept} kept: {sparse_parts:?}, {} bytes",
        total(&sparse_parts)
    );
    println!(
        "positions: {:.3} bits per weight (bitmask: 1)",
        sparse_parts["1.weight.positions"] as f64 * 8.0 / numel as f64
    );
    // 4 bits per index: 102,400 bytes, and the 16-entry codebook.
    assert_eq!(dense_parts["1.weight.indices"], 102_400);
    assert_eq!(dense_parts["1.weight.codebook"], 64);
    assert_eq!(sparse_parts["1.weight.indices"], (kept * 4).div_ceil(8));
    // The entropy of 10 % density is 0.469 bits per weight; the Rice code of geometric gaps
    // comes within a few percent of it, half the bitmask's one bit.
    let density = kept as f64 / numel as f64;
    let entropy = -(density * density.log2() + (1.0 - density) * (1.0 - density).log2());
    let positions_bits = sparse_parts["1.weight.positions"] as f64 * 8.0 / numel as f64;
    assert!(
        positions_bits < 1.05 * entropy,
        "{positions_bits} against {entropy}"
    );
    assert!(total(&sparse_parts) < 24_000, "{sparse_parts:?}");
    // The engine: CSR for the sparse layer (400 x 512 at 10 %), dense f32 for the other.
    let execution = |b: &[u8]| Model::from_bytes(b).unwrap().execution()[0].1;
    assert_eq!(execution(&dense_bytes), Execution::F32);
    assert_eq!(execution(&sparse_bytes), Execution::Csr { nnz: kept });
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn encoded_palettes_decode_to_the_reference(
        rows in 1usize..6,
        cols in 1usize..48,
        clusters in 1usize..=256,
        per_channel in any::<bool>(),
        density in prop_oneof![Just(None), (0.0f32..=1.0).prop_map(Some)],
        seed in any::<u64>(),
    ) {
        let granularity = if per_channel { Granularity::PerChannel } else { Granularity::PerTensor };
        let c = Clustered::random([rows, cols], clusters, granularity, density, seed);
        let (_, values) = decoded(&artifact_of([rows, cols], c.encoded()));
        prop_assert_eq!(bits_of(&values), bits_of(&c.values(cols)));
    }

    #[test]
    fn clustered_values_round_trip_through_storage(
        rows in 1usize..6,
        cols in 1usize..64,
        levels in 1usize..20,
        zeros in 0.0f32..1.0,
        per_channel in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let mut rng = Rng::new(seed);
        let values: Vec<f32> = (0..rows * cols)
            .map(|_| {
                if (rng.uniform() + 1.0) / 2.0 < zeros {
                    0.0
                } else {
                    (((rng.uniform() + 1.0) / 2.0 * levels as f32) as i32 - 7) as f32 * 0.3
                }
            })
            .collect();
        let granularity = if per_channel { Granularity::PerChannel } else { Granularity::PerTensor };
        let mut b = ArtifactBuilder::new(linear(rows, cols));
        b.add_layer(1, &values, &vec![0.0; rows], Storage::Palette(granularity)).unwrap();
        let bytes = b.to_bytes().unwrap();
        let (scheme, decoded) = decoded(&bytes);
        prop_assert_eq!(bits_of(&decoded), bits_of(&values), "{}", scheme);
    }
}

/// A CSR weight holds only its non-zeros, so a file of a few bytes could declare a layer
/// whose dense form does not fit in memory: refused like a sparse palette.
#[test]
fn a_csr_weight_has_the_same_size_limit() {
    let mut b = ArtifactBuilder::new(linear(2, 3));
    b.add(
        "1.weight",
        &[0.0, 1.0, 0.0, 0.0, 0.0, 2.0],
        &[2, 3],
        Storage::Csr,
    )
    .unwrap()
    .add("1.bias", &[0.0; 2], &[2], Storage::F32)
    .unwrap();
    let small = b.to_bytes().unwrap();
    assert!(Artifact::from_bytes(&small).is_ok());
    let inputs = 1 << 14;
    let out = MAX_SPARSE_ELEMENTS / inputs + 1;
    let huge = edit_metadata(&small, |m| {
        let mut spec = linear(out, inputs);
        spec.input = [1, 128, 128];
        m.insert("network".into(), serde_json::to_string(&spec).unwrap());
        let tensors = serde_json::json!({
            "1.weight": {"scheme": "csr", "shape": [out, inputs]},
            "1.bias": {"scheme": "f32"},
        });
        m.insert("tensors".into(), tensors.to_string());
    });
    let (e, s) = err(&huge);
    assert!(matches!(e, Error::Unsupported { .. }), "{s}");
    assert!(s.contains("csr weight `1.weight`"), "{s}");
    assert!(s.contains("above the limit of 67108864"), "{s}");
}

/// A palette layer with input quantization runs full-integer: its decoded values on the
/// per-channel int8 grid of the `int8` scheme, so it computes what the same values stored
/// as int8 compute, bit for bit, dense and sparse.
#[test]
fn palette_layers_with_input_quantization_run_like_int8() {
    let spec = crate::common::mlp();
    let p = params(&spec, 4);
    let x = images(5, &spec, 6);
    for density in [None, Some(0.1)] {
        let mut palette = ArtifactBuilder::new(spec.clone());
        let mut int8 = ArtifactBuilder::new(spec.clone());
        for (&i, param) in &p {
            let c = Clustered::random(
                [param.shape[0], param.shape[1]],
                16,
                Granularity::PerTensor,
                density,
                i as u64,
            );
            let values = c.values(param.shape[0] * param.shape[1]);
            let grid = QParams::u8(0.02 * (i + 1) as f32, 3);
            palette
                .add_encoded(&format!("{i}.weight"), &param.shape, c.encoded())
                .unwrap()
                .add(
                    &format!("{i}.bias"),
                    &param.bias,
                    &[param.shape[0]],
                    Storage::F32,
                )
                .unwrap()
                .set_input_quantization(i, grid);
            int8.add_layer(
                i,
                &values,
                &param.bias,
                Storage::Int8(Granularity::PerChannel),
            )
            .unwrap()
            .set_input_quantization(i, grid);
        }
        let palette = Model::from_bytes(&palette.to_bytes().unwrap()).unwrap();
        let int8 = Model::from_bytes(&int8.to_bytes().unwrap()).unwrap();
        assert_eq!(palette.execution(), int8.execution(), "density {density:?}");
        for (layer, execution) in palette.execution() {
            assert!(
                matches!(execution, Execution::Int8Static { .. }),
                "layer {layer}: {execution:?}"
            );
        }
        assert_eq!(palette.run(x.view()).unwrap(), int8.run(x.view()).unwrap());
    }
}
