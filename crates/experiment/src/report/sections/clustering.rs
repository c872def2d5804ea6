//! The `clustering` stage's section: every clustered teacher against the float32 teacher,
//! and accuracy against size.

use std::fmt::Write as _;

use plots::Series;

use crate::charts::Figure;
use crate::report::Row;
use crate::report::detail::Detail;
use crate::stage::Stage;
use crate::variant::{Clustered, ClusteredStorage, Sparsity};

use super::{Chart, Reference, Section, accuracy_size, size_point};

/// Accuracy against size, one series per base and storage through the cluster counts.
pub const ACCURACY_SIZE: Chart = Chart {
    file: "clustering_accuracy_size.svg",
    title: "Clustered teacher: test accuracy against artifact size",
    caption: "The clustered teacher, dense and 90% sparse, palettized and as int8: test \
              accuracy against artifact size (log scale), each point labelled with its number \
              of clusters, and the float32 teacher.",
};

/// The section of the stage's rows: `bases` clustered to each of `clusters`, compared with
/// `reference`.
pub fn section(
    rows: &[Row],
    reference: Reference,
    bases: &[Sparsity],
    clusters: &[usize],
) -> Section {
    Section {
        markdown: table(rows, reference),
        figures: vec![size_figure(rows, reference, bases, clusters)],
    }
}

/// How the report names what was clustered.
pub fn base_name(base: Sparsity) -> String {
    match base {
        Sparsity::Dense => "dense teacher".into(),
        other => format!(
            "{} teacher of the pruning stage, zeros kept",
            pruned_name(other)
        ),
    }
}

fn table(rows: &[Row], reference: Reference) -> String {
    let mut md = format!(
        "The teacher's weights clustered per tensor (k-means++ centroids, fine-tuned for an \
         epoch with the centroids trained), dense and on top of the pruning stage's \
         90%-sparse teacher with its zeros kept; each deployed palettized (indices and a \
         codebook) and as int8, and run by the runtime. Compared with the float32 teacher \
         ({:.2}%, {} bytes).\n\n\
         | variant | clusters | weight sparsity | accuracy | vs teacher (pp) | bytes | smaller | gzip smaller | speed-up |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        reference.accuracy * 100.0,
        reference.size_bytes,
    );
    for row in rows {
        let Detail::Clustering(detail) = &row.detail else {
            continue;
        };
        let d = &detail.deployment;
        let _ = writeln!(
            md,
            "| {} | {} | {:.1}% | {:.2}% | {:+.2} | {} | {:.1}x | {:.1}x | {:.2}x |",
            row.variant,
            detail.clusters,
            detail.weight_sparsity * 100.0,
            row.test_accuracy.unwrap_or(f64::NAN) * 100.0,
            d.accuracy_delta_pp,
            row.size_bytes.unwrap_or(0),
            d.size_ratio,
            d.gzip_ratio,
            d.speedup,
        );
    }
    md
}

/// Accuracy against artifact size, one line per base and storage through the cluster
/// counts, and the float32 teacher.
fn size_figure(
    rows: &[Row],
    reference: Reference,
    bases: &[Sparsity],
    clusters: &[usize],
) -> Figure {
    let mut series = Vec::new();
    for &base in bases {
        for storage in [ClusteredStorage::Palette, ClusteredStorage::Int8] {
            let mine: Vec<(usize, &Row)> = clusters
                .iter()
                .filter_map(|&clusters| {
                    let variant = Clustered {
                        base,
                        clusters,
                        storage,
                    };
                    let row = rows.iter().find(|r| r.is(Stage::Clustering, variant))?;
                    Some((clusters, row))
                })
                .collect();
            let points = mine.iter().map(|(_, r)| size_point(r)).collect();
            let storage_name = match storage {
                ClusteredStorage::Palette => "palettized",
                ClusteredStorage::Int8 => "int8",
            };
            let label = format!("{}, {storage_name}", pruned_name(base));
            let mut s = Series::new(&label, points);
            s.point_labels = mine.iter().map(|(k, _)| format!("k={k}")).collect();
            series.push(s);
        }
    }
    series.push(Series::new(
        "float32 teacher",
        vec![(
            reference.size_bytes as f64 / 1024.0,
            reference.accuracy * 100.0,
        )],
    ));
    accuracy_size(&ACCURACY_SIZE, series)
}

fn pruned_name(sparsity: Sparsity) -> String {
    match sparsity {
        Sparsity::Dense => "dense".into(),
        Sparsity::Percent(p) => format!("{p}%-sparse"),
        Sparsity::NOutOfM { n, m } => format!("{n}:{m}-sparse"),
    }
}
