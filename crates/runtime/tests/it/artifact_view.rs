//! `Artifact`: the decoded parameters of every storage scheme, as the builder wrote them.

use model_spec::{LayerSpec, NetworkSpec};
use runtime::{
    Artifact, ArtifactBuilder, Encoded, Granularity, QParams, Scheme, Storage, WeightValues,
};

use crate::common::{Store, artifact, params};

/// A conv2d, a ReLU, a flatten and a linear layer: one layer of each parameterised kind.
fn network() -> NetworkSpec {
    NetworkSpec {
        name: "view".into(),
        input: [2, 5, 5],
        layers: vec![
            LayerSpec::Conv2d {
                in_channels: 2,
                out_channels: 4,
                kernel: 3,
                stride: 1,
                padding: 1,
            },
            LayerSpec::Relu,
            LayerSpec::Flatten,
            LayerSpec::Linear {
                in_features: 100,
                out_features: 3,
            },
        ],
    }
}

#[test]
fn float_schemes_give_their_values() {
    let spec = network();
    let p = params(&spec, 7);
    for store in [Store::F32, Store::F16, Store::Csr] {
        let bytes = artifact(&spec, &p, |_| store).to_bytes().unwrap();
        let view = Artifact::from_bytes(&bytes).unwrap();
        assert_eq!(view.network(), Some(&spec));
        assert_eq!(view.shapes().len(), spec.layers.len() + 1);
        assert!(view.layer(1).is_none() && view.layer(2).is_none() && view.layer(9).is_none());
        for (&i, param) in &p {
            let layer = view.layer(i).unwrap();
            assert_eq!(layer.weight_shape, param.shape);
            assert_eq!(layer.bias_scheme, Scheme::F32);
            assert_eq!(layer.bias, param.bias);
            assert_eq!(layer.input_quantization, None);
            let WeightValues::Float(values) = &layer.weight else {
                panic!("{store:?}: {:?}", layer.weight);
            };
            let expected: Vec<f32> = match store {
                // The builder rounds to half precision; the view widens exactly.
                Store::F16 => param
                    .weight
                    .iter()
                    .map(|&w| half::f16::from_f32(w).to_f32())
                    .collect(),
                _ => param.weight.clone(),
            };
            assert_eq!(values, &expected, "{store:?}");
        }
    }
}

#[test]
fn int8_schemes_give_codes_scales_and_input_quantization() {
    let spec = network();
    let p = params(&spec, 8);
    let input = QParams::u8(0.02, 3);
    for granularity in [Granularity::PerChannel, Granularity::PerTensor] {
        let mut dense = artifact(&spec, &p, |_| Store::Int8(granularity));
        dense.set_input_quantization(3, input);
        let view = Artifact::from_bytes(&dense.to_bytes().unwrap()).unwrap();
        assert_eq!(view.layer(0).unwrap().input_quantization, None);
        assert_eq!(view.layer(3).unwrap().input_quantization, Some(input));
        for (&i, param) in &p {
            let layer = view.layer(i).unwrap();
            assert_eq!(layer.weight_scheme, Scheme::Int8 { granularity });
            let WeightValues::Int8 {
                codes,
                scales,
                zero_points,
                granularity: found,
            } = &layer.weight
            else {
                panic!("{:?}", layer.weight);
            };
            assert_eq!(*found, granularity);
            assert_eq!(codes.len(), param.weight.len());
            assert_eq!(scales.len(), param.shape[0]);
            assert_eq!(zero_points, &vec![0; param.shape[0]]);
            let k = codes.len() / scales.len();
            for (j, (&q, &w)) in codes.iter().zip(&param.weight).enumerate() {
                let s = scales[j / k];
                // Symmetric rounding to nearest: within half a step.
                assert!((f32::from(q) * s - w).abs() <= 0.5 * s * (1.0 + 1e-5));
            }
        }
    }
}

#[test]
fn int8_sparse_codes_are_filled_in_with_the_zero_point() {
    let spec = network();
    let p = params(&spec, 9);
    let (out, k) = (4, 18);
    let codes: Vec<i8> = (0..out * k)
        .map(|i| if i % 3 == 0 { (i % 50) as i8 - 20 } else { 2 })
        .collect();
    let scales = [0.1, 0.2, 0.3, 0.4];
    let zero_points = [2i8; 4];
    let mut b = ArtifactBuilder::new(spec.clone());
    b.add_encoded(
        "0.weight",
        &[4, 2, 3, 3],
        Encoded::Int8 {
            codes: &codes,
            scales: &scales,
            zero_points: &zero_points,
            granularity: Granularity::PerChannel,
            sparse: true,
        },
    )
    .unwrap()
    .add("0.bias", &p[&0].bias, &[4], Storage::F16)
    .unwrap()
    .add("3.weight", &p[&3].weight, &[3, 100], Storage::F32)
    .unwrap()
    .add("3.bias", &p[&3].bias, &[3], Storage::F32)
    .unwrap();
    let view = Artifact::from_bytes(&b.to_bytes().unwrap()).unwrap();
    let conv = view.layer(0).unwrap();
    assert_eq!(conv.bias_scheme, Scheme::F16);
    assert_eq!(
        conv.weight,
        WeightValues::Int8 {
            codes,
            scales: scales.to_vec(),
            zero_points: zero_points.to_vec(),
            granularity: Granularity::PerChannel,
        }
    );
}

#[test]
fn a_damaged_file_is_an_error() {
    let spec = network();
    let bytes = artifact(&spec, &params(&spec, 1), |_| Store::F32)
        .to_bytes()
        .unwrap();
    assert!(Artifact::from_bytes(&bytes[..bytes.len() - 1]).is_err());
    assert!(Artifact::from_bytes(&[]).is_err());
}
