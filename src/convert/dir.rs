//! [`convert_dir`]: the folder-to-folder conversion, with its refusals and atomic writes.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use safetensors::tensor::SafeTensors;
use serde::Deserialize;

use super::{
    ConversionReport, ConvertOptions, DEQUANTIZED_DIR, Progress, REPORT_FILE, TOKENIZER_FILES,
    convert_bytes, dequantized_f16, preflight,
};
use crate::formats::hf::{CONFIG_FILE, INDEX_FILE, WEIGHTS_FILE, save_dir};
use crate::{Error, Result};

/// Input files are read in pieces of this size, so that progress moves while a multi-gigabyte
/// file loads.
const READ_CHUNK: u64 = 64 << 20;

/// Converts the full-precision checkpoint folder `input` (config.json plus model.safetensors, or
/// model.safetensors.index.json and its shards) into `output` (see the [module docs](super) for
/// what is written), returning the statistics also written there.
///
/// Refused before anything is written: `output` the same folder as `input` or inside it (symlinks
/// resolved); `output` a file, or a folder that already holds a model or any file this would write
/// (config.json, safetensors files, the report, the tokenizer files, the dequantized folder); every
/// refusal of [`convert_bytes`]. All of the input is read and converted before the first write, so
/// a truncated or corrupt input leaves no output. Each file is written under a temporary name,
/// synced and renamed; should a write fail, the files and folders this call created are removed.
/// The packed config.json is written last, so a folder with it is a finished conversion.
pub fn convert_dir(
    input: &Path,
    output: &Path,
    options: &ConvertOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<ConversionReport> {
    let config_path = input.join(CONFIG_FILE);
    let config_text = std::fs::read_to_string(&config_path).map_err(io_error(&config_path))?;
    preflight(&config_text, options)?;
    let (input_resolved, output_resolved) = (resolve(input)?, resolve(output)?);
    if output_resolved.starts_with(&input_resolved) {
        return Err(Error::invalid(
            "output folder",
            if output_resolved == input_resolved {
                "the output folder is the input folder; convert never overwrites its input"
            } else {
                "the output folder is inside the input folder; convert never writes into its input"
            },
        ));
    }
    check_output_free(output)?;

    let (names, weight_map) = shard_names(input)?;
    let paths: Vec<PathBuf> = names.iter().map(|n| input.join(n)).collect();
    let mut total = 0;
    for path in &paths {
        total += std::fs::metadata(path).map_err(io_error(path))?.len();
    }
    let mut done = 0;
    let mut contents = Vec::with_capacity(paths.len());
    for (name, path) in names.iter().zip(&paths) {
        contents.push(read_file(path, name, &mut done, total, progress)?);
    }
    let shards: Vec<(&str, &[u8])> = names
        .iter()
        .map(String::as_str)
        .zip(contents.iter().map(Vec::as_slice))
        .collect();
    if let Some(map) = weight_map {
        check_index(&map, &shards)?;
    }
    let mut conversion = convert_bytes(&config_text, &shards, options, progress)?;
    drop(shards);
    drop(contents);

    let copied: Vec<&str> = TOKENIZER_FILES
        .into_iter()
        .filter(|name| input.join(name).is_file())
        .collect();
    let report = &mut conversion.report;
    report.copied_files = copied.iter().map(|s| s.to_string()).collect();
    report.dequantized_f16 = options.dequantized_f16.then(|| DEQUANTIZED_DIR.to_string());

    let mut written = Written::default();
    let result = (|| {
        written.create_dir(output)?;
        if options.dequantized_f16 {
            let dequantized = dequantized_f16(&conversion.weights)?;
            let dir = output.join(DEQUANTIZED_DIR);
            written.create_dir(&dir)?;
            let file = format!("{DEQUANTIZED_DIR}/{WEIGHTS_FILE}");
            written.write(output, &file, &dequantized.safetensors, progress)?;
            drop(dequantized.safetensors);
            for name in &copied {
                let bytes = read(&input.join(name))?;
                written.write(
                    output,
                    &format!("{DEQUANTIZED_DIR}/{name}"),
                    &bytes,
                    progress,
                )?;
            }
            let file = format!("{DEQUANTIZED_DIR}/{CONFIG_FILE}");
            written.write(output, &file, dequantized.config_json.as_bytes(), progress)?;
        }
        for name in &copied {
            let bytes = read(&input.join(name))?;
            written.write(output, name, &bytes, progress)?;
        }
        let mut json =
            serde_json::to_string_pretty(&conversion.report).expect("a plain struct serializes");
        json.push('\n');
        written.write(output, REPORT_FILE, json.as_bytes(), progress)?;
        save_dir(&conversion.weights, output, &conversion.report.metadata())?;
        for name in [WEIGHTS_FILE, CONFIG_FILE] {
            // Written already: a failing stat only costs the progress line.
            if let Ok(meta) = std::fs::metadata(output.join(name)) {
                progress(Progress::Wrote {
                    file: name.to_string(),
                    bytes: meta.len(),
                });
            }
        }
        Ok(())
    })();
    match result {
        Ok(()) => Ok(conversion.report),
        Err(e) => {
            written.roll_back();
            Err(e)
        }
    }
}

/// What a conversion created, so that a failure can take it back.
#[derive(Default)]
pub(super) struct Written {
    files: Vec<PathBuf>,
    dirs: Vec<PathBuf>,
}

impl Written {
    pub(super) fn create_dir(&mut self, dir: &Path) -> Result<()> {
        let missing: Vec<PathBuf> = dir
            .ancestors()
            .take_while(|d| !d.as_os_str().is_empty() && !d.exists())
            .map(Path::to_path_buf)
            .collect();
        std::fs::create_dir_all(dir).map_err(io_error(dir))?;
        // Newest and innermost first, the order in which they can be removed.
        self.dirs.splice(0..0, missing);
        Ok(())
    }

    /// Writes `bytes` to `output/file` under a temporary name, syncs and renames it, never
    /// replacing an existing file.
    pub(super) fn write(
        &mut self,
        output: &Path,
        file: &str,
        bytes: &[u8],
        progress: &mut dyn FnMut(Progress),
    ) -> Result<()> {
        let path = output.join(file);
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or(file);
        let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .and_then(|mut f| {
                f.write_all(bytes)?;
                f.sync_all()
            });
        if let Err(e) = written {
            if e.kind() != std::io::ErrorKind::AlreadyExists {
                let _ = std::fs::remove_file(&tmp);
            }
            return Err(io_error(&tmp)(e));
        }
        if path.exists() {
            let _ = std::fs::remove_file(&tmp);
            return Err(refusal(&path, "already exists; convert never overwrites"));
        }
        if let Err(e) = std::fs::rename(&tmp, &path) {
            let _ = std::fs::remove_file(&tmp);
            return Err(io_error(&path)(e));
        }
        self.files.push(path);
        progress(Progress::Wrote {
            file: file.to_string(),
            bytes: bytes.len() as u64,
        });
        Ok(())
    }

    pub(super) fn roll_back(self) {
        for file in self.files.iter().rev() {
            let _ = std::fs::remove_file(file);
        }
        for dir in &self.dirs {
            // Only if empty: a folder someone else filled meanwhile stays.
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// The path with its existing part canonicalized (symlinks and `..` resolved), so that two
/// spellings of one folder compare equal even when the folder does not exist yet.
pub(super) fn resolve(path: &Path) -> Result<PathBuf> {
    let absolute = std::path::absolute(path).map_err(io_error(path))?;
    let mut existing = absolute.as_path();
    let mut missing = Vec::new();
    loop {
        if let Ok(mut resolved) = existing.canonicalize() {
            resolved.extend(missing.iter().rev());
            return Ok(resolved);
        }
        match (existing.file_name(), existing.parent()) {
            (Some(name), Some(parent)) => {
                missing.push(name);
                existing = parent;
            }
            _ => return Ok(absolute),
        }
    }
}

/// Errors if `output` is a file, or a folder holding a model or anything a conversion writes.
fn check_output_free(output: &Path) -> Result<()> {
    if !output.exists() {
        return Ok(());
    }
    if !output.is_dir() {
        return Err(refusal(output, "exists and is not a folder"));
    }
    let entries = std::fs::read_dir(output).map_err(io_error(output))?;
    for entry in entries {
        let entry = entry.map_err(io_error(output))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let ours = [CONFIG_FILE, INDEX_FILE, REPORT_FILE, DEQUANTIZED_DIR].contains(&name.as_str())
            || TOKENIZER_FILES.contains(&name.as_str())
            || name.ends_with(".safetensors");
        if ours {
            return Err(refusal(
                &entry.path(),
                "already exists: the output folder holds a model or an earlier conversion; \
                 convert never overwrites (choose a new or empty folder)",
            ));
        }
    }
    Ok(())
}

/// The safetensors files of a checkpoint folder: model.safetensors (which wins, as in
/// `formats::hf::load_dir`), or the shards its index names, with the index's tensor -> shard map.
type ShardNames = (Vec<String>, Option<BTreeMap<String, String>>);

fn shard_names(dir: &Path) -> Result<ShardNames> {
    if dir.join(WEIGHTS_FILE).exists() {
        return Ok((vec![WEIGHTS_FILE.to_string()], None));
    }
    let index_path = dir.join(INDEX_FILE);
    if !index_path.exists() {
        return Err(Error::Io {
            path: dir.display().to_string(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("neither {WEIGHTS_FILE} nor {INDEX_FILE} is in this folder"),
            ),
        });
    }
    let map = index(&index_path)?;
    let mut names: Vec<String> = map.values().cloned().collect();
    names.sort();
    names.dedup();
    Ok((names, Some(map)))
}

#[derive(Deserialize)]
struct Index {
    weight_map: BTreeMap<String, String>,
}

/// The index's tensor -> shard map, refusing shard names that would reach outside the folder.
fn index(path: &Path) -> Result<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(path).map_err(io_error(path))?;
    let index: Index = serde_json::from_str(&text).map_err(|e| Error::invalid(INDEX_FILE, e))?;
    for file in index.weight_map.values() {
        if Path::new(file).file_name().and_then(|n| n.to_str()) != Some(file.as_str()) {
            return Err(Error::invalid(
                INDEX_FILE,
                format!("shard {file:?} is not a file name in the checkpoint's folder"),
            ));
        }
    }
    Ok(index.weight_map)
}

/// Errors unless each tensor the index lists is in the shard it names.
fn check_index(weight_map: &BTreeMap<String, String>, shards: &[(&str, &[u8])]) -> Result<()> {
    for (tensor, file) in weight_map {
        let bytes = shards
            .iter()
            .find(|(name, _)| name == file)
            .map(|(_, bytes)| *bytes)
            .expect("every shard of the index was read");
        let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| {
            Error::Safetensors(format!(
                "{file}: not a complete safetensors file (truncated or corrupt?): {e}"
            ))
        })?;
        if !header.tensors().contains_key(tensor) {
            return Err(Error::Safetensors(format!(
                "{INDEX_FILE} puts tensor `{tensor}` in {file}, but it is not there"
            )));
        }
    }
    Ok(())
}

fn read_file(
    path: &Path,
    name: &str,
    done: &mut u64,
    total: u64,
    progress: &mut dyn FnMut(Progress),
) -> Result<Vec<u8>> {
    let mut file = std::fs::File::open(path).map_err(io_error(path))?;
    let mut bytes = Vec::new();
    loop {
        let n = (&mut file)
            .take(READ_CHUNK)
            .read_to_end(&mut bytes)
            .map_err(io_error(path))?;
        if n == 0 {
            return Ok(bytes);
        }
        *done += n as u64;
        progress(Progress::Read {
            file: name.to_string(),
            bytes: *done,
            total,
        });
    }
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(io_error(path))
}

pub(super) fn refusal(path: &Path, why: &str) -> Error {
    Error::Io {
        path: path.display().to_string(),
        source: std::io::Error::new(std::io::ErrorKind::AlreadyExists, why),
    }
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.display().to_string(),
        source,
    }
}
