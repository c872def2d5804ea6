//! The loader rejects every malformed artifact with an error that says what is wrong, and
//! never panics.

use model_spec::{InputNormalization, LayerSpec, NetworkSpec};
use proptest::prelude::*;
use quantization::{BitWidth, quantize_weights};
use runtime::{ArtifactBuilder, Encoded, Error, Granularity, Model, QParams, Storage};
use safetensors::Dtype;

use crate::common::{Store, artifact, edit_file, edit_metadata, params};

/// A small but complete network: conv, pool, linear, every parameter kind present.
fn small_spec() -> NetworkSpec {
    NetworkSpec {
        name: "small".into(),
        input: [1, 6, 6],
        layers: vec![
            LayerSpec::Conv2d {
                in_channels: 1,
                out_channels: 2,
                kernel: 3,
                stride: 1,
                padding: 0,
            },
            LayerSpec::Relu,
            LayerSpec::MaxPool2d {
                kernel: 2,
                stride: 2,
            },
            LayerSpec::Flatten,
            LayerSpec::Linear {
                in_features: 8,
                out_features: 3,
            },
        ],
    }
}

fn small(store: impl Fn(usize) -> Store) -> Vec<u8> {
    let spec = small_spec();
    artifact(&spec, &params(&spec, 1), store)
        .to_bytes()
        .unwrap()
}

fn err(bytes: &[u8]) -> (Error, String) {
    let e = Model::from_bytes(bytes).unwrap_err();
    let s = e.to_string();
    (e, s)
}

#[test]
fn a_valid_artifact_loads() {
    for store in [
        Store::F32,
        Store::F16,
        Store::Int8(Granularity::PerTensor),
        Store::Int8Compact(Granularity::PerChannel),
        Store::Csr,
    ] {
        Model::from_bytes(&small(|_| store)).unwrap();
    }
}

#[test]
fn unknown_format_and_version_are_named() {
    let bytes = small(|_| Store::F32);
    let (e, s) = err(&edit_metadata(&bytes, |m| {
        m.insert("format".into(), "onnx".into());
    }));
    assert!(
        matches!(e, Error::UnknownFormat { .. }) && s.contains("`onnx`"),
        "{s}"
    );
    let (e, s) = err(&edit_metadata(&bytes, |m| {
        m.insert("format_version".into(), "4".into());
    }));
    assert!(matches!(e, Error::UnsupportedVersion { .. }), "{s}");
    assert!(
        s.contains("format version `4`") && s.contains("reads versions 1, 2 and 3"),
        "{s}"
    );
    let (e, s) = err(&edit_metadata(&bytes, |m| {
        m.remove("format_version");
    }));
    assert!(
        matches!(
            e,
            Error::MissingMetadata {
                key: "format_version",
                ..
            }
        ),
        "{s}"
    );
    assert!(s.starts_with("<bytes> lacks"), "{s}");
    let (e, _) = err(&edit_metadata(&bytes, |m| m.clear()));
    assert!(matches!(e, Error::MissingMetadata { key: "format", .. }));
}

#[test]
fn malformed_metadata_json_is_an_error() {
    let bytes = small(|_| Store::F32);
    for key in ["network", "tensors", "activations"] {
        let (e, s) = err(&edit_metadata(&bytes, |m| {
            m.insert(key.into(), "{not json".into());
        }));
        assert!(matches!(e, Error::MalformedMetadata { .. }), "{key}: {s}");
        assert!(s.contains(&format!("metadata `{key}`")), "{s}");
    }
    let (_, s) = err(&edit_metadata(&bytes, |m| {
        m.insert(
            "network".into(),
            r#"{"name":"x","input":[1,6,6],"layers":[{"op":"softmax"}]}"#.into(),
        );
    }));
    assert!(s.contains("softmax"), "{s}");
    let (_, s) = err(&edit_metadata(&bytes, |m| {
        m.insert("tensors".into(), r#"{"0.weight":{"scheme":"int4"}}"#.into());
    }));
    assert!(s.contains("int4"), "{s}");
}

#[test]
fn invalid_networks_are_errors() {
    let mut spec = small_spec();
    spec.layers[4] = LayerSpec::Linear {
        in_features: 9,
        out_features: 3,
    };
    let bytes = edit_metadata(&small(|_| Store::F32), |m| {
        m.insert("network".into(), serde_json::to_string(&spec).unwrap());
    });
    let (e, s) = err(&bytes);
    assert!(matches!(e, Error::InvalidNetwork { .. }), "{s}");
    assert!(s.contains("layer 4 (linear)"), "{s}");
    // Hyperparameters that would overflow shape arithmetic are refused before it.
    let mut spec = small_spec();
    spec.layers[0] = LayerSpec::Conv2d {
        in_channels: 1,
        out_channels: 2,
        kernel: 3,
        stride: 1,
        padding: usize::MAX / 2,
    };
    let (_, s) = err(&edit_metadata(&small(|_| Store::F32), |m| {
        m.insert("network".into(), serde_json::to_string(&spec).unwrap());
    }));
    assert!(s.contains("above the limit"), "{s}");
    let mut spec = small_spec();
    spec.input = [1 << 20, 1 << 20, 1 << 20];
    let (_, s) = err(&edit_metadata(&small(|_| Store::F32), |m| {
        m.insert("network".into(), serde_json::to_string(&spec).unwrap());
    }));
    assert!(s.contains("exceeds"), "{s}");
}

#[test]
fn unfolded_batch_norm_is_refused() {
    let mut spec = small_spec();
    spec.layers.insert(
        1,
        LayerSpec::BatchNorm2d {
            features: 2,
            eps: 1e-5,
        },
    );
    let (e, s) = err(&edit_metadata(&small(|_| Store::F32), |m| {
        m.insert("network".into(), serde_json::to_string(&spec).unwrap());
    }));
    assert!(matches!(e, Error::Unsupported { .. }), "{s}");
    assert!(s.contains("layer 1 (batch_norm2d)"), "{s}");
    assert!(s.contains("folded"), "{s}");
}

#[test]
fn missing_and_unexpected_tensors_are_named() {
    let bytes = small(|_| Store::F32);
    let (e, s) = err(&edit_file(&bytes, |_, t| {
        t.remove("4.bias");
    }));
    assert!(
        matches!(e, Error::MissingTensor { .. }) && s.contains("`4.bias`"),
        "{s}"
    );
    let (e, s) = err(&edit_file(&bytes, |_, t| {
        t.insert("extra".into(), (Dtype::F32, vec![1], vec![0; 4]));
    }));
    assert!(
        matches!(e, Error::UnexpectedTensor { .. }) && s.contains("`extra`"),
        "{s}"
    );
    let int8 = small(|_| Store::Int8(Granularity::PerChannel));
    let (_, s) = err(&edit_file(&int8, |_, t| {
        t.remove("0.weight.scale");
    }));
    assert!(s.contains("`0.weight.scale`"), "{s}");
    let (_, s) = err(&edit_metadata(&bytes, |m| {
        m.insert(
            "tensors".into(),
            r#"{"0.weight":{"scheme":"f32"},"0.bias":{"scheme":"f32"},"4.bias":{"scheme":"f32"}}"#
                .into(),
        );
    }));
    assert!(s.contains("no scheme for `4.weight`"), "{s}");
    let (_, s) = err(&edit_metadata(&bytes, |m| {
        let mut t: serde_json::Value = serde_json::from_str(&m["tensors"]).unwrap();
        t["2.weight"] = serde_json::json!({"scheme": "f32"});
        m.insert("tensors".into(), t.to_string());
    }));
    assert!(s.contains("`2.weight`, which no layer"), "{s}");
}

#[test]
fn shapes_must_match_the_network() {
    let spec = small_spec();
    let p = params(&spec, 2);
    // A conv weight must be [out, in, k, k]: give it [2, 9] instead.
    let mut b = ArtifactBuilder::new(spec.clone());
    b.add("0.weight", &p[&0].weight, &[2, 9], Storage::F32)
        .unwrap();
    b.add("0.bias", &p[&0].bias, &[2], Storage::F32).unwrap();
    b.add("4.weight", &p[&4].weight, &[3, 8], Storage::F32)
        .unwrap();
    b.add("4.bias", &p[&4].bias, &[3], Storage::F32).unwrap();
    let (e, s) = err(&b.to_bytes().unwrap());
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{s}");
    assert!(
        s.contains("`0.weight` has shape [2, 9], expected [2, 1, 3, 3]"),
        "{s}"
    );
    // A bias of the wrong length.
    let mut b = ArtifactBuilder::new(spec.clone());
    b.add("0.weight", &p[&0].weight, &[2, 1, 3, 3], Storage::F32)
        .unwrap();
    b.add("0.bias", &[0.0; 3], &[3], Storage::F32).unwrap();
    b.add("4.weight", &p[&4].weight, &[3, 8], Storage::F32)
        .unwrap();
    b.add("4.bias", &p[&4].bias, &[3], Storage::F32).unwrap();
    let (_, s) = err(&b.to_bytes().unwrap());
    assert!(s.contains("`0.bias` has shape [3], expected [2]"), "{s}");
    // Per-channel scales with the wrong count.
    let mut b = ArtifactBuilder::new(spec.clone());
    b.add_encoded(
        "0.weight",
        &[2, 1, 3, 3],
        Encoded::Int8 {
            codes: &[1; 18],
            scales: &[0.1, 0.1],
            zero_points: &[0, 0],
            granularity: Granularity::PerChannel,
            sparse: false,
        },
    )
    .unwrap();
    b.add("0.bias", &p[&0].bias, &[2], Storage::F32).unwrap();
    b.add_encoded(
        "4.weight",
        &[3, 8],
        Encoded::Int8 {
            codes: &[1; 24],
            scales: &[0.5],
            zero_points: &[0],
            granularity: Granularity::PerTensor,
            sparse: false,
        },
    )
    .unwrap();
    b.add("4.bias", &p[&4].bias, &[3], Storage::F32).unwrap();
    Model::from_bytes(&b.to_bytes().unwrap()).unwrap();
    let bytes = edit_metadata(&b.to_bytes().unwrap(), |m| {
        let t = m["tensors"].replace("per_tensor", "per_channel");
        m.insert("tensors".into(), t);
    });
    let (_, s) = err(&bytes);
    assert!(
        s.contains("`4.weight.scale` has shape [1], expected [3]"),
        "{s}"
    );
}

#[test]
fn dtypes_must_match_the_scheme() {
    let bytes = small(|_| Store::F32);
    let (e, s) = err(&edit_metadata(&bytes, |m| {
        let t = m["tensors"].replacen(r#""scheme":"f32""#, r#""scheme":"f16""#, 1);
        m.insert("tensors".into(), t);
    }));
    assert!(matches!(e, Error::DtypeMismatch { .. }), "{s}");
    assert!(s.contains("has dtype F32, its scheme needs F16"), "{s}");
    let int8 = small(|_| Store::Int8(Granularity::PerChannel));
    let (_, s) = err(&edit_file(&int8, |_, t| {
        let zp = t.get_mut("4.weight.zero_point").unwrap();
        *zp = (Dtype::I32, vec![3], vec![0; 12]);
    }));
    assert!(
        s.contains("`4.weight.zero_point` has dtype I32, its scheme needs I8"),
        "{s}"
    );
    // A bias stored as int8 is refused: biases are f32 or f16.
    let (e, s) = err(&edit_file(&bytes, |m, t| {
        let tensors = m["tensors"].replace(
            r#""4.bias":{"scheme":"f32"}"#,
            r#""4.bias":{"scheme":"int8","granularity":"per_tensor"}"#,
        );
        m.insert("tensors".into(), tensors);
        t.insert("4.bias".into(), (Dtype::I8, vec![3], vec![0; 3]));
    }));
    assert!(
        matches!(e, Error::Unsupported { .. }) && s.contains("biases must be f32 or f16"),
        "{s}"
    );
}

#[test]
fn scales_must_be_positive_and_finite() {
    let int8 = small(|_| Store::Int8(Granularity::PerChannel));
    for bad in [0.0f32, -1.0, f32::NAN, f32::INFINITY] {
        let (e, s) = err(&edit_file(&int8, |_, t| {
            let scale = t.get_mut("4.weight.scale").unwrap();
            scale.2[4..8].copy_from_slice(&bad.to_le_bytes());
        }));
        assert!(matches!(e, Error::InvalidTensor { .. }), "{s}");
        assert!(
            s.contains("`4.weight.scale`")
                && s.contains("scale 1 is")
                && s.contains("not positive and finite"),
            "{s}"
        );
    }
}

#[test]
fn csr_arrays_are_validated() {
    let csr = small(|_| Store::Csr);
    let set_i32 = |name: &'static str, index: usize, value: i32| {
        edit_file(&csr, move |_, t| {
            let data = &mut t.get_mut(name).unwrap().2;
            data[index * 4..index * 4 + 4].copy_from_slice(&value.to_le_bytes());
        })
    };
    let (e, s) = err(&set_i32("4.weight.col_idx", 0, 8));
    assert!(matches!(e, Error::InvalidTensor { .. }), "{s}");
    assert!(
        s.contains("`4.weight`") && s.contains("column index 8") && s.contains("out of range"),
        "{s}"
    );
    let (_, s) = err(&set_i32("4.weight.col_idx", 0, -1));
    assert!(
        s.contains("`4.weight.col_idx`") && s.contains("negative"),
        "{s}"
    );
    let (_, s) = err(&set_i32("4.weight.row_ptr", 1, 20));
    assert!(s.contains("not monotone"), "{s}");
    let (_, s) = err(&set_i32("4.weight.row_ptr", 0, 1));
    assert!(s.contains("starts at 1"), "{s}");
    let (_, s) = err(&edit_metadata(&csr, |m| {
        let t = m["tensors"].replace("[3,8]", "[4,6]");
        m.insert("tensors".into(), t);
    }));
    assert!(
        s.contains("`4.weight` has shape [4, 6], expected [3, 8]"),
        "{s}"
    );
}

#[test]
fn sparse_int8_arrays_are_validated() {
    let spec = small_spec();
    let mut p = params(&spec, 5);
    for param in p.values_mut() {
        for (i, w) in param.weight.iter_mut().enumerate() {
            if i % 4 != 0 {
                *w = 0.0;
            }
        }
    }
    let sparse = artifact(&spec, &p, |_| Store::Int8Compact(Granularity::PerChannel))
        .to_bytes()
        .unwrap();
    Model::from_bytes(&sparse).unwrap();
    // The linear weight: 3 x 8 = 24 elements, 3 mask bytes, 6 codes kept.
    let edit = |f: fn(&mut (Dtype, Vec<usize>, Vec<u8>))| {
        edit_file(&sparse, move |_, t| f(t.get_mut("4.weight.mask").unwrap()))
    };
    let (e, s) = err(&edit(|mask| mask.2[0] |= 0b10));
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{s}");
    assert!(s.contains("`4.weight.values`") && s.contains("[7]"), "{s}");
    let (e, s) = err(&edit(|mask| {
        mask.1 = vec![2];
        mask.2.truncate(2);
    }));
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{s}");
    assert!(s.contains("`4.weight.mask`"), "{s}");
    // The conv weight: 18 elements, so the last of its 3 mask bytes has 6 padding bits.
    let (e, s) = err(&edit_file(&sparse, |_, t| {
        t.get_mut("0.weight.mask").unwrap().2[2] |= 0x80
    }));
    assert!(matches!(e, Error::InvalidTensor { .. }), "{s}");
    assert!(s.contains("bits past the 18 elements"), "{s}");
}

#[test]
fn activation_quantization_is_validated() {
    let spec = small_spec();
    let p = params(&spec, 3);
    let mut b = artifact(&spec, &p, |_| Store::Int8(Granularity::PerChannel));
    b.set_input_quantization(4, QParams::u8(0.1, 3));
    Model::from_bytes(&b.to_bytes().unwrap()).unwrap();
    for (layer, q, needle) in [
        (4, QParams::u8(0.0, 3), "not a positive finite scale"),
        (4, QParams::u8(0.1, 256), "zero point 256"),
        (
            1,
            QParams::u8(0.1, 0),
            "entry `1` is not a conv2d or linear layer",
        ),
    ] {
        let mut b = b.clone();
        b.set_input_quantization(layer, q);
        let (e, s) = err(&b.to_bytes().unwrap());
        assert!(
            matches!(
                e,
                Error::MalformedMetadata {
                    key: "activations",
                    ..
                }
            ),
            "{s}"
        );
        assert!(s.contains(needle), "{s}");
    }
    let mut f32_model = artifact(&spec, &p, |_| Store::F32);
    f32_model.set_input_quantization(0, QParams::u8(0.1, 0));
    let (_, s) = err(&f32_model.to_bytes().unwrap());
    assert!(s.contains("its weight is not int8"), "{s}");
}

#[test]
fn activation_quantization_is_stored_as_a_scale_and_a_zero_point() {
    let spec = small_spec();
    let p = params(&spec, 3);
    let mut b = artifact(&spec, &p, |_| Store::Int8(Granularity::PerChannel));
    b.set_input_quantization(4, QParams::u8(0.25, 3));
    let bytes = b.to_bytes().unwrap();
    let mut stored = None;
    edit_metadata(&bytes, |m| stored = m.get("activations").cloned());
    assert_eq!(
        stored.as_deref(),
        Some(r#"{"4":{"scale":0.25,"zero_point":3}}"#)
    );
    // An entry written by another tool in the documented shape decodes onto the u8 grid.
    let edited = edit_metadata(&bytes, |m| {
        m.insert(
            "activations".into(),
            r#"{"4": {"zero_point": 7, "scale": 0.5}}"#.into(),
        );
    });
    let view = runtime::Artifact::from_bytes(&edited).unwrap();
    let q = view.layer(4).unwrap().input_quantization.unwrap();
    assert_eq!(q, QParams::u8(0.5, 7));
    assert_eq!((q.qmin, q.qmax), (0, 255));
    // The format has no room for other grids: the builder refuses them.
    let four_bits = QParams::asymmetric(-1.0, 1.0, BitWidth::new(4).unwrap());
    b.set_input_quantization(4, four_bits);
    let e = b.to_bytes().unwrap_err().to_string();
    assert!(e.contains("layer 4 has levels 0..=15"), "{e}");
}

#[test]
fn quantized_weights_feed_the_builder_as_it_quantizes_them() {
    let spec = small_spec();
    let p = params(&spec, 5);
    for granularity in [Granularity::PerChannel, Granularity::PerTensor] {
        let mut by_builder = ArtifactBuilder::new(spec.clone());
        let mut by_hand = ArtifactBuilder::new(spec.clone());
        for (&i, param) in &p {
            let (name, bias) = (format!("{i}.weight"), format!("{i}.bias"));
            by_builder
                .add(
                    &name,
                    &param.weight,
                    &param.shape,
                    Storage::Int8(granularity),
                )
                .unwrap()
                .add(&bias, &param.bias, &param.shape[..1], Storage::F32)
                .unwrap();
            let rows = param.shape[0];
            let q = quantize_weights(&param.weight, rows, granularity, BitWidth::INT8).unwrap();
            assert_eq!(q.granularity, granularity);
            match q.granularity {
                Granularity::PerChannel => by_hand.add_encoded(
                    &name,
                    &param.shape,
                    Encoded::Int8 {
                        codes: &q.values,
                        scales: &q.scales,
                        zero_points: &q.zero_points,
                        granularity: Granularity::PerChannel,
                        sparse: false,
                    },
                ),
                Granularity::PerTensor => by_hand.add_encoded(
                    &name,
                    &param.shape,
                    Encoded::Int8 {
                        codes: &q.values,
                        scales: &[q.scales[0]],
                        zero_points: &[q.zero_points[0]],
                        granularity: Granularity::PerTensor,
                        sparse: false,
                    },
                ),
            }
            .unwrap()
            .add(&bias, &param.bias, &param.shape[..1], Storage::F32)
            .unwrap();
        }
        assert_eq!(by_builder.to_bytes().unwrap(), by_hand.to_bytes().unwrap());
    }
}

#[test]
fn the_builder_checks_lengths_and_duplicates() {
    let mut b = ArtifactBuilder::new(small_spec());
    let e = b
        .add("0.weight", &[0.0; 5], &[2, 1, 3, 3], Storage::F32)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`0.weight`: data has 5 values, expected 18"),
        "{e}"
    );
    b.add("0.bias", &[0.0; 2], &[2], Storage::F32).unwrap();
    let e = b
        .add("0.bias", &[0.0; 2], &[2], Storage::F16)
        .unwrap_err()
        .to_string();
    assert!(e.contains("added twice"), "{e}");
    let e = b
        .add_encoded(
            "4.weight",
            &[3, 8],
            Encoded::Int8 {
                codes: &[0; 24],
                scales: &[1.0; 2],
                zero_points: &[0; 3],
                granularity: Granularity::PerChannel,
                sparse: false,
            },
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("scales has 2 values, expected 3"), "{e}");
    let e = b
        .add(
            "4.weight",
            &[f32::NAN; 24],
            &[3, 8],
            Storage::Int8(Granularity::PerChannel),
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`4.weight`") && e.contains("non-finite value at index 0"),
        "{e}"
    );
    assert!(
        ArtifactBuilder::default()
            .to_bytes()
            .unwrap_err()
            .to_string()
            .contains("no network")
    );
}

#[test]
fn add_layer_takes_names_and_shapes_from_the_network() {
    let spec = small_spec();
    let ps = params(&spec, 3);
    let mut by_layer = ArtifactBuilder::new(spec.clone());
    for (&i, p) in &ps {
        by_layer
            .add_layer(
                i,
                &p.weight,
                &p.bias,
                Storage::Int8(Granularity::PerChannel),
            )
            .unwrap();
    }
    let by_name = artifact(&spec, &ps, |_| Store::Int8(Granularity::PerChannel));
    assert_eq!(by_layer.to_bytes().unwrap(), by_name.to_bytes().unwrap());

    let mut b = ArtifactBuilder::new(spec);
    let e = b
        .add_layer(1, &[], &[], Storage::F32)
        .unwrap_err()
        .to_string();
    assert!(e.contains("layer 1 (relu) has no weight"), "{e}");
    let e = b
        .add_layer(9, &[], &[], Storage::F32)
        .unwrap_err()
        .to_string();
    assert!(e.contains("layer 9 does not exist"), "{e}");
    let e = b
        .add_layer(0, &[0.0; 18], &[0.0; 3], Storage::F32)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`0.bias`: data has 3 values, expected 2"), "{e}");
}

#[test]
fn input_normalization_is_recorded_and_validated() {
    let spec = small_spec();
    let normalization = InputNormalization::new(255.0, vec![0.1307], vec![0.3081]).unwrap();
    let mut b = artifact(&spec, &params(&spec, 1), |_| Store::F32);
    b.set_input_normalization(normalization.clone());
    let bytes = b.to_bytes().unwrap();
    let model = Model::from_bytes(&bytes).unwrap();
    assert_eq!(model.input_normalization(), Some(&normalization));

    // The raw pixels run through the recorded normalisation, bit for bit.
    let [c, h, w] = spec.input;
    let raw: Vec<u8> = (0..2 * c * h * w).map(|i| (i * 37 % 256) as u8).collect();
    let raw = ndarray::Array4::from_shape_vec((2, c, h, w), raw).unwrap();
    let x = raw.mapv(|p| (f32::from(p) / 255.0 - 0.1307) / 0.3081);
    assert_eq!(
        model.run_raw(raw.view()).unwrap(),
        model.run(x.view()).unwrap()
    );

    let plain = Model::from_bytes(&small(|_| Store::F32)).unwrap();
    assert_eq!(plain.input_normalization(), None);
    let e = plain.run_raw(raw.view()).unwrap_err();
    assert!(matches!(e, Error::NoNormalization { .. }), "{e}");

    for (json, reason) in [
        (r#"{"raw_max":0,"mean":[0.1],"std":[0.3]}"#, "raw_max"),
        (
            r#"{"raw_max":255,"mean":[0.1],"std":[-1]}"#,
            "standard deviation",
        ),
        (
            r#"{"raw_max":255,"mean":[0.1, 0.2],"std":[0.3, 0.3]}"#,
            "or one per channel",
        ),
        (r#"{"raw_max":255,"mean":[],"std":[]}"#, "at least one"),
        (
            r#"{"raw_max":255,"mean":[0.1],"std":[0.3],"layout":"nhwc"}"#,
            "nhwc",
        ),
        (
            r#"{"raw_max":255,"mean":[0.1],"std":[0.3],"extra":1}"#,
            "extra",
        ),
    ] {
        let (e, s) = err(&edit_metadata(&bytes, |m| {
            m.insert("input".into(), json.into());
        }));
        assert!(
            matches!(e, Error::MalformedMetadata { key: "input", .. }) && s.contains(reason),
            "{json}: {s}"
        );
    }
}

#[test]
fn version_1_artifacts_load_without_normalization() {
    let bytes = edit_metadata(&small(|_| Store::F32), |m| {
        m.insert("format_version".into(), "1".into());
    });
    let model = Model::from_bytes(&bytes).unwrap();
    assert_eq!(model.input_normalization(), None);
    let (e, s) = err(&edit_metadata(&bytes, |m| {
        m.insert(
            "input".into(),
            r#"{"raw_max":255,"mean":[0.1],"std":[0.3]}"#.into(),
        );
    }));
    assert!(
        matches!(e, Error::MalformedMetadata { key: "input", .. }),
        "{s}"
    );
}

#[test]
fn every_truncation_is_an_error() {
    let bytes = small(|_| Store::Int8(Granularity::PerChannel));
    for len in 0..bytes.len() {
        let (e, _) = err(&bytes[..len]);
        assert!(matches!(e, Error::Damaged { .. }), "length {len}: {e}");
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(matches!(err(&longer).0, Error::Damaged { .. }));
}

#[test]
fn hostile_offsets_are_errors_not_panics() {
    // Offsets near usize::MAX would overflow safetensors' own sums.
    let header = format!(
        r#"{{"a":{{"dtype":"U8","shape":[{}],"data_offsets":[0,{}]}}}}"#,
        usize::MAX / 2,
        usize::MAX / 2
    );
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    assert!(matches!(err(&bytes).0, Error::Damaged { .. }));
    let mut huge = u64::MAX.to_le_bytes().to_vec();
    huge.extend_from_slice(b"{}");
    assert!(matches!(err(&huge).0, Error::Damaged { .. }));
}

#[test]
fn every_single_byte_corruption_is_handled() {
    // Flipping any byte either still loads (a changed weight) or is an error: never a panic.
    let bytes = small(|i| {
        if i == 0 {
            Store::Csr
        } else {
            Store::Int8(Granularity::PerChannel)
        }
    });
    for i in 0..bytes.len() {
        for flip in [0x01u8, 0x80, 0xff] {
            let mut b = bytes.clone();
            b[i] ^= flip;
            let _ = Model::from_bytes(&b);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        prop_assert!(Model::from_bytes(&bytes).is_err());
    }

    #[test]
    fn random_headers_never_panic(json in "\\{(\"[a-z._]{1,8}\":\\{\"dtype\":\"(F32|I8|I32|F16)\",\"shape\":\\[[0-9]{1,3}\\],\"data_offsets\":\\[[0-9]{1,3},[0-9]{1,3}\\]\\},?){0,3}\\}", pad in 0usize..64) {
        let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(json.as_bytes());
        bytes.extend(std::iter::repeat_n(0u8, pad));
        let _ = Model::from_bytes(&bytes);
    }
}
