//! The loss curve as a PNG image, drawn with `plotters` into a bitmap and encoded with `png`.
//! Plotters draws text only with a font backend, which needs system fonts; the image has none:
//! loss.csv holds the numbers, the picture shows their shape.

use std::path::Path;

use plotters::prelude::*;

use super::checkpoint::write_atomic;
use crate::{Error, Result};

const WIDTH: u32 = 800;
const HEIGHT: u32 = 500;

/// Draws the training loss per step (blue) and the eval loss (red, at the steps it was
/// measured) on white, with a frame and a horizontal line at each whole loss value, the y axis
/// from 0 (or the smallest loss, rounded down) to the largest, and writes the image to `path`
/// atomically. Non-finite values are skipped. Errors: drawing or encoding failures and I/O.
pub fn plot_losses(path: &Path, train: &[(usize, f64)], eval: &[(usize, f64)]) -> Result<()> {
    let finite = |v: &&(usize, f64)| v.1.is_finite();
    let all: Vec<(usize, f64)> = train.iter().chain(eval).filter(finite).copied().collect();
    let fail = |e: String| Error::invalid("loss plot", e);
    let mut rgb = vec![255u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (WIDTH, HEIGHT)).into_drawing_area();
        let x_max = all.iter().map(|p| p.0).max().unwrap_or(1).max(1) as f64;
        let y_max = all.iter().map(|p| p.1).fold(1.0f64, f64::max).ceil();
        let y_min = all
            .iter()
            .map(|p| p.1)
            .fold(y_max, f64::min)
            .floor()
            .max(0.0);
        let y_min = if y_min >= y_max { 0.0 } else { y_min };
        let mut chart = ChartBuilder::on(&root)
            .margin(20)
            .build_cartesian_2d(0f64..x_max, y_min..y_max)
            .map_err(|e| fail(e.to_string()))?;
        let grey = RGBColor(220, 220, 220);
        let mut y = y_min;
        while y <= y_max {
            chart
                .draw_series(LineSeries::new([(0.0, y), (x_max, y)], &grey))
                .map_err(|e| fail(e.to_string()))?;
            y += 1.0;
        }
        chart
            .draw_series(LineSeries::new(
                [
                    (0.0, y_min),
                    (x_max, y_min),
                    (x_max, y_max),
                    (0.0, y_max),
                    (0.0, y_min),
                ],
                &BLACK,
            ))
            .map_err(|e| fail(e.to_string()))?;
        for (points, color) in [(train, BLUE), (eval, RED)] {
            let series = points
                .iter()
                .filter(finite)
                .map(|&(step, loss)| (step as f64, loss));
            chart
                .draw_series(LineSeries::new(series, color.stroke_width(2)))
                .map_err(|e| fail(e.to_string()))?;
        }
        root.present().map_err(|e| fail(e.to_string()))?;
    }
    let mut bytes = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut bytes, WIDTH, HEIGHT);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().map_err(|e| fail(e.to_string()))?;
        writer
            .write_image_data(&rgb)
            .map_err(|e| fail(e.to_string()))?;
    }
    write_atomic(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_a_png() {
        let dir = std::env::temp_dir().join(format!("bitnet-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("loss.png");
        let train: Vec<(usize, f64)> = (0..50).map(|s| (s, 5.0 / (1.0 + s as f64))).collect();
        plot_losses(&path, &train, &[(10, 1.0), (40, f64::NAN), (49, 0.5)]).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        // No points at all still gives an image.
        plot_losses(&path, &[], &[]).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
